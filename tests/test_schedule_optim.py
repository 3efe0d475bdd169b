import pytest
import torch

from clipguard.models import create_model
from clipguard.training.optim import clip_grad_norm, make_optimizer
from clipguard.training.schedule import Schedule, Segment, warmup_cosine


@pytest.mark.parametrize("total,warmup", [(100, 10), (37, 5), (10, 0), (5, 20)])
def test_warmup_cosine_never_rises_after_peak_and_ends_at_floor(total, warmup):
    s = warmup_cosine(total, 1e-3, warmup, min_lr=1e-5)
    lrs = [s.lr_at(i) for i in range(total)]
    peak = max(range(total), key=lambda i: lrs[i])
    assert all(lrs[i] >= lrs[i + 1] - 1e-15 for i in range(peak, total - 1))
    assert all(lrs[i] <= lrs[i + 1] for i in range(peak))
    assert lrs[-1] == pytest.approx(1e-5) and max(lrs) == pytest.approx(1e-3)


def test_segments_are_laid_end_to_end():
    s = Schedule([Segment(10, 1e-3, warmup=2, final_lr=1e-4), Segment(5, 5e-6), Segment(10, 1e-3, 0, 0.0)])
    assert s.total_steps == 25
    assert s.lr_at(0) == pytest.approx(5e-4) and s.lr_at(9) == pytest.approx(1e-4)
    assert all(s.lr_at(i) == 5e-6 for i in range(10, 15))
    assert s.lr_at(15) == pytest.approx(1e-3) and s.lr_at(24) == pytest.approx(0.0)
    tail = [s.lr_at(i) for i in range(15, 25)]
    assert tail == sorted(tail, reverse=True)


def test_param_groups_skip_decay_on_norms_biases_and_logit_scale():
    m = create_model("cg-tiny", seed=0)
    opt = make_optimizer(m, 1e-3, weight_decay=0.2)
    names = {id(p): n for n, p in m.named_parameters()}
    nodecay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert "logit_scale" in nodecay and opt.param_groups[0]["weight_decay"] == 0.0
    assert all(("ln" in n or "bias" in n or m.get_parameter(n).ndim < 2 or "logit_scale" in n) for n in nodecay)
    assert all(m.get_parameter(n).ndim >= 2 and "bias" not in n for n in decay)
    assert len(nodecay) + len(decay) == len(list(m.parameters()))


def test_a_warm_up_may_start_above_the_peak_and_fall_to_it():
    s = Schedule([Segment(100, 1e-4, warmup=50, final_lr=0.0, start_lr=1e-3)])
    lrs = [s.lr_at(i) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[25] == pytest.approx(5.5e-4) and lrs[50] == pytest.approx(1e-4)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0)
    # without start_lr the warm-up rises from zero, as before
    assert Segment(10, 1e-3, warmup=4).lr(0) == pytest.approx(2.5e-4)


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_clip_grad_norm_equals_torch_bit_for_bit_within_and_beyond_the_bound(scale):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(40, 30)) for _ in range(4)] + [torch.nn.Parameter(torch.randn(7))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref):
        a.grad = torch.randn_like(a) * scale
        b.grad = a.grad.clone()
    ref[-1].grad, ours[-1].grad = None, None  # a parameter without a gradient is skipped, as torch does
    total_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    total = clip_grad_norm(ours, 1.0)
    assert torch.equal(total, total_ref)
    assert (float(total) > 1.0) == (scale > 1)  # one case inside the bound, one clipped
    for a, b in zip(ours[:-1], ref[:-1]):
        assert torch.equal(a.grad, b.grad)
