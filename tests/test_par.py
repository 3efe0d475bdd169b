"""PAR (Perturb and Recover): the loss by hand, the threshold, the exact reduction to CLIP, the
frozen starting model (never trained, never saved, the same after a resume)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _training import make_batch, make_ctx
from safetensors.torch import load_file

from clipguard import defenses
from clipguard.cli import main
from clipguard.data.augment import Views
from clipguard.errors import ConfigError
from clipguard.models import save_checkpoint
from clipguard.models.factory import create_model
from clipguard.tensors import normalize
from clipguard.training.strategy import ClipStrategy
from clipguard.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _perturb(model, visual: float, text: float, seed: int = 0) -> None:
    """Move the trained model away from its start, the image and text towers by different amounts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = visual if name.startswith("visual.") else text
            p.add_(scale * torch.randn(p.shape, generator=g))


def _features(model, pixels, tokens):
    img, txt, scale = model(normalize(pixels), tokens)
    return img, txt, scale


def _clip(img, txt, scale):
    logits = scale * img @ txt.t()
    labels = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _sq(a, b):
    return (a - b).pow(2).sum(1).mean()


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def test_registered_options_validated_and_reachable_from_a_bench_entry():
    from clipguard.bench.config import parse_config, validate_names
    from clipguard.training.recipes import SMALL_LR
    from clipguard.training.spec import resolve_spec

    assert "par" in defenses.names()
    s = defenses.build("par", {"tau": 1.5, "push_weight": 0.5, "image_augment": "crop-flip", "push_text": "false"})
    assert (s.name, s.opt.tau, s.opt.push_weight, s.opt.image_augment, s.opt.push_text) == \
        ("par", 1.5, 0.5, "crop-flip", False)
    assert defenses.build("par").opt.tau == 2.15
    with pytest.raises(ConfigError, match="tau must be >= 0"):
        defenses.build("par", {"tau": -1})
    with pytest.raises(ConfigError, match="option 'image_augment' must be one of"):
        defenses.build("par", {"image_augment": "autoaugment"})
    with pytest.raises(ConfigError, match="did you mean 'tau'"):
        defenses.build("par", {"tua": 1})
    spec = resolve_spec(stage="finetune", defense="par", options={"tau": 1.0})
    assert spec.train.lr == SMALL_LR["par"] and spec.build_strategy().opt.tau == 1.0  # cg-tiny's recipe for PAR
    grid = {"name": "t", "seeds": [0],
            "datasets": {"fm": {"builtin": "fashion-mnist", "train_size": 200, "test_size": 100}},
            "attacks": {"badnet": {"attack": "badnet", "target": "bag", "rate": 0.05}},
            "pretrain": {"train": {"epochs": 1}, "defenses": {"CLIP": "none"}},
            "finetune": {"train": {"epochs": 1}, "defenses": {"PAR": {"defense": "par", "options": {"tau": 1.0}}}}}
    validate_names(parse_config(grid))
    grid["finetune"]["defenses"]["PAR"]["options"] = {"tau": -2}
    with pytest.raises(ConfigError, match="finetune.defenses.PAR.*tau must be >= 0"):
        validate_names(parse_config(grid))


@pytest.mark.parametrize("augment", ["simclr", "none"])
def test_loss_equals_the_hand_computation(toy, augment):
    ctx = make_ctx(toy, seed=0)
    s = defenses.build("par", {"tau": 3.9, "push_weight": 2.0, "image_augment": augment})
    s.bind(ctx)
    _perturb(ctx.model, visual=0.05, text=0.05)
    batch = make_batch(ctx, seed=7)
    got, logs = s.loss(batch)

    start = create_model("cg-tiny", seed=0).eval()   # the model the run started from, rebuilt
    pixels = batch.pixels if augment == "none" else \
        Views(crop_scale_min=0.08).images(batch.pixels, torch.Generator().manual_seed(7))
    img, txt, scale = _features(ctx.model, pixels, batch.tokens)
    with torch.no_grad():
        img0, txt0, _ = _features(start, pixels, batch.tokens)
    p_img, p_txt = _sq(img, img0), _sq(txt, txt0)
    assert 0 < _f(p_img) <= 3.9 and 0 < _f(p_txt) <= 3.9     # both terms active
    want = _clip(img, txt, scale) - 2.0 * 0.5 * (p_img + p_txt)
    assert _f(got) == pytest.approx(_f(want), rel=1e-5, abs=1e-6)
    assert logs["p_img"] == pytest.approx(_f(p_img), rel=1e-5)
    assert logs["p_txt"] == pytest.approx(_f(p_txt), rel=1e-5)
    assert logs["clip_loss"] == pytest.approx(_f(_clip(img, txt, scale)), rel=1e-5)
    assert logs["p_img_active"] == logs["p_txt_active"] == 1.0
    # the gradient too: d/dw of the hand loss (one parameter of each tower)
    got.backward()
    g_got = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}
    ctx.model.zero_grad()
    want.backward()
    for n, p in ctx.model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_got[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_clip_on_originals_recovers_on_the_images_and_pushes_on_the_views(toy):
    ctx = make_ctx(toy, seed=0)
    s = defenses.build("par", {"tau": 3.9, "image_augment": "simclr", "clip_on": "originals"})
    s.bind(ctx)
    _perturb(ctx.model, visual=0.05, text=0.05)
    batch = make_batch(ctx, seed=7)
    got, logs = s.loss(batch)
    views = Views(crop_scale_min=0.08).images(batch.pixels, torch.Generator().manual_seed(7))
    img, txt, scale = _features(ctx.model, batch.pixels, batch.tokens)
    img_v, _, _ = _features(ctx.model, views, batch.tokens)
    with torch.no_grad():
        img0, txt0, _ = _features(s.frozen, views, batch.tokens)
    want = _clip(img, txt, scale) - 0.5 * (_sq(img_v, img0) + _sq(txt, txt0))
    assert _f(got) == pytest.approx(_f(want), rel=1e-5, abs=1e-6)
    assert logs["clip_loss"] == pytest.approx(_f(_clip(img, txt, scale)), rel=1e-5)
    assert logs["p_img"] == pytest.approx(_f(_sq(img_v, img0)), rel=1e-5)
    with pytest.raises(ConfigError, match="clip_on"):
        defenses.build("par", {"clip_on": "both"})


def test_a_term_above_tau_is_zeroed_with_its_gradient(toy):
    ctx = make_ctx(toy)
    s = defenses.build("par", {"image_augment": "none", "tau": 1.0})
    s.bind(ctx)
    _perturb(ctx.model, visual=1.0, text=0.002)          # image embeddings far from the start, text close
    batch = make_batch(ctx, seed=1)
    got, logs = s.loss(batch)
    assert logs["p_img"] > 1.0 and logs["p_img_active"] == 0.0
    assert logs["p_txt"] <= 1.0 and logs["p_txt_active"] == 1.0
    img, txt, scale = _features(ctx.model, batch.pixels, batch.tokens)
    with torch.no_grad():
        _, txt0, _ = _features(s.frozen, batch.pixels, batch.tokens)
    want = _clip(img, txt, scale) - 0.5 * _sq(txt, txt0)     # P_img contributes nothing
    assert _f(got) == pytest.approx(_f(want), rel=1e-5)

    # both above tau: the loss IS the CLIP loss, value and gradient, bit for bit
    s2 = defenses.build("par", {"image_augment": "none", "tau": 1e-12})
    s2.bind(ctx)                                         # start = the perturbed model ...
    _perturb(ctx.model, visual=0.01, text=0.01, seed=1)  # ... moved a little: both P > 1e-12
    got2, logs2 = s2.loss(batch)
    assert logs2["p_img_active"] == logs2["p_txt_active"] == 0.0
    ctx.model.zero_grad()
    got2.backward()
    g_par = [p.grad.clone() for p in ctx.model.parameters()]
    clip_s = ClipStrategy()
    clip_s.bind(ctx)
    ref, _ = clip_s.loss(batch)
    ctx.model.zero_grad()
    ref.backward()
    assert torch.equal(got2, ref)
    assert all(torch.equal(a, p.grad) for a, p in zip(g_par, ctx.model.parameters()))
    # and the thresholded term alone has a zero gradient
    p = torch.tensor(1.5, requires_grad=True)
    defenses.build("par", {"tau": 1.0})._thresholded(p * 2).backward()
    assert float(p.grad) == 0.0


@pytest.mark.parametrize("opts", [{"tau": 0.0}, {"push_weight": 0.0}])
def test_tau_zero_or_weight_zero_is_exactly_clip(toy, opts):
    ctx = make_ctx(toy)
    ref_s = ClipStrategy()
    ref_s.bind(ctx)
    ref, _ = ref_s.loss(make_batch(ctx, 3))
    s = defenses.build("par", {**opts, "image_augment": "none"})
    s.bind(ctx)
    got, logs = s.loss(make_batch(ctx, 3))
    assert torch.equal(ref, got) and s.frozen is None and set(logs) == {"clip_loss"}
    # with views: exactly the CLIP loss of the same seeded view
    s = defenses.build("par", {**opts, "image_augment": "simclr"})
    s.bind(ctx)
    got, _ = s.loss(make_batch(ctx, 3))
    pixels = Views().images(make_batch(ctx, 3).pixels, torch.Generator().manual_seed(3))
    img, txt, scale = ctx.forward(pixels, ctx.tokens[: len(toy)])
    assert _f(got) == pytest.approx(_f(_clip(img, txt, scale)), rel=1e-6)


def test_views_are_seeded_and_one_forward_of_the_trained_model(toy):
    ctx = make_ctx(toy)
    s = defenses.build("par", {"image_augment": "simclr"})
    s.bind(ctx)
    _perturb(ctx.model, 0.05, 0.05)
    calls = []
    orig = ctx.forward
    ctx.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    a, la = s.loss(make_batch(ctx, 4))
    b, lb = s.loss(make_batch(ctx, 4))
    c, lc = s.loss(make_batch(ctx, 5))
    assert torch.equal(a, b) and la == lb and lc["p_img"] != la["p_img"]
    assert len(calls) == 3


def test_push_text_false_drops_the_text_term(toy):
    ctx = make_ctx(toy)
    s = defenses.build("par", {"push_text": False, "image_augment": "none", "tau": 3.9})
    s.bind(ctx)
    _perturb(ctx.model, 0.05, 0.05)
    batch = make_batch(ctx, 0)
    got, logs = s.loss(batch)
    assert "p_txt" not in logs
    img, txt, scale = _features(ctx.model, batch.pixels, batch.tokens)
    with torch.no_grad():
        img0, _, _ = _features(s.frozen, batch.pixels, batch.tokens)
    assert _f(got) == pytest.approx(_f(_clip(img, txt, scale) - 0.5 * _sq(img, img0)), rel=1e-5)


# ------------------------------------------------------------------ with the trainer
@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The (pretend poisoned) model fine-tuning starts from, as a checkpoint file."""
    folder = tmp_path_factory.mktemp("par_start") / "epoch_001"
    save_checkpoint(folder, create_model("cg-tiny", seed=5), state={"model": "cg-tiny"}, model_name="cg-tiny")
    return folder / "model.safetensors"


def _cfg(start, **kw):
    base = dict(model="cg-tiny", epochs=2, batch_size=32, lr=2e-3, warmup=1, seed=0, device="cpu", quiet=True,
                checkpoint=str(start), weight_decay=0.1)
    base.update(kw)
    return TrainConfig(**base)


def _par(**opts):
    return defenses.build("par", {"tau": 3.9, **opts})


def _latest(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_model_is_the_start_never_trained_never_saved(fm_train, start, tmp_path):
    data = fm_train.subset(range(64))
    t = Trainer(_cfg(start, epochs=1), data, tmp_path / "run", strategy=_par())
    t.fit()
    start_sd = load_file(str(start))
    frozen = t.strategy.frozen
    assert _same({k: v for k, v in frozen.state_dict().items()}, start_sd)          # unchanged by the steps
    assert not _same(t.model.state_dict(), start_sd)                                 # the model did train
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert next(frozen.parameters()).device == next(t.model.parameters()).device
    assert all(m is not frozen for m in t.model.modules())                          # not a submodule
    opt_params = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in frozen.parameters()}
    rec = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])
    assert rec["p_img"] > 0 and 0 <= rec["p_img_active"] <= 1 and "p_txt" in rec
    # the checkpoint holds the trained model once, and no copy of the frozen one
    ck = _latest(tmp_path / "run")
    saved = load_file(str(ck / "model.safetensors"))
    assert saved.keys() == create_model("cg-tiny").state_dict().keys()
    assert load_file(str(ck / "strategy.safetensors")) == {}
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors", "open_clip_config.json",
                                                    "optimizer.safetensors", "state.json", "strategy.safetensors"]
    state = json.loads((ck / "state.json").read_text())
    assert state["strategy"] == "par" and set(state["strategy_state"]) == {"start_weights"}


def test_resume_is_exact_and_keeps_the_original_start(fm_train, start, tmp_path):
    data = fm_train.subset(range(128))
    Trainer(_cfg(start), data, tmp_path / "a", strategy=_par()).fit()
    Trainer(_cfg(start, stop_after=1), data, tmp_path / "b", strategy=_par()).fit()
    after_one = load_file(str(_latest(tmp_path / "b") / "model.safetensors"))
    t = Trainer(_cfg(start), data, tmp_path / "b", strategy=_par())
    t.fit(resume="latest")
    # the frozen model of the resumed run is the fine-tuning start, not the epoch-1 weights it resumed
    assert _same(t.strategy.frozen.state_dict(), load_file(str(start)))
    assert not _same(t.strategy.frozen.state_dict(), after_one)
    wa = load_file(str(_latest(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(_latest(tmp_path / "b") / "model.safetensors"))
    assert _same(wa, wb)
    ra = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    keys = ("epoch", "loss", "clip_loss", "p_img", "p_txt", "p_img_active", "p_txt_active", "lr")
    assert [{k: r[k] for k in keys} for r in ra] == [{k: r[k] for k in keys} for r in rb]


def test_resume_with_other_start_weights_is_refused(fm_train, tmp_path):
    data = fm_train.subset(range(64))
    folder = tmp_path / "start"
    save_checkpoint(folder, create_model("cg-tiny", seed=5), state={"model": "cg-tiny"})
    f = folder / "model.safetensors"
    Trainer(_cfg(f, stop_after=1), data, tmp_path / "run", strategy=_par()).fit()
    save_checkpoint(folder, create_model("cg-tiny", seed=6), state={"model": "cg-tiny"})  # same path, new weights
    with pytest.raises(ConfigError, match="start weights.*not the ones this run started from"):
        Trainer(_cfg(f), data, tmp_path / "run", strategy=_par()).fit(resume="latest")


def test_finetune_cli_with_par(fm_dir, start, tmp_path):
    out = tmp_path / "par"
    assert main(["finetune", "--checkpoint", str(start), "--data", str(fm_dir / "train.csv"), "--defense", "par",
                 "--opt", "tau=1.5", "--opt", "image_augment=crop-flip", "--out", str(out), "--epochs", "1",
                 "--batch-size", "32", "--limit", "64", "--lr", "1e-3", "--device", "cpu", "--quiet"]) == 0
    params = json.loads((out / "params.json").read_text())
    assert params["defense"] == "par" and params["strategy"]["tau"] == 1.5
    assert params["strategy"]["image_augment"] == "crop-flip" and params["train"]["model"] == "cg-tiny"
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert {"clip_loss", "p_img", "p_txt", "p_img_active", "p_txt_active"} <= set(rec)


def test_the_authors_view_and_schedule(toy):
    from clipguard.data.augment import noise_erase

    ctx = make_ctx(toy)
    ctx.epochs, ctx.steps_per_epoch = 2, 10
    s = defenses.build("par", {"image_augment": "noise-erase", "lr_schedule": "paper"})
    s.bind(ctx)
    lrs = [s.schedule(ctx, warmup=3, min_lr=0.0).lr_at(i) for i in range(20)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0)
    assert lrs == sorted(lrs, reverse=True)
    assert defenses.build("par").opt == s.opt                        # the defaults since round 7
    trainer = defenses.build("par", {"lr_schedule": "trainer"})
    assert trainer.schedule(ctx, warmup=3, min_lr=0.0).lr_at(0) == pytest.approx(1e-3 / 3)
    batch = make_batch(ctx, seed=5)
    assert torch.equal(s._augment(batch), noise_erase(batch.pixels, torch.Generator().manual_seed(5)))
    with pytest.raises(ConfigError, match="lr_start_factor must be > 0"):
        defenses.build("par", {"lr_start_factor": 0})


def test_the_printed_schedule_says_what_runs():
    assert defenses.build("par").describe_schedule(1e-4, 20) == \
        "lr 0.001 falling to 0.0001 over half the run, then the cosine (PAR's schedule)"
    assert defenses.build("par", {"lr_schedule": "trainer"}).describe_schedule(1e-3, 20) == "lr 0.001, warm-up 20"
    assert defenses.build("ft").describe_schedule(3e-4, 20) == "lr 0.0003, warm-up 20"
