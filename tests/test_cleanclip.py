"""CleanCLIP strategy: exact reduction to CLIP, fresh seeded views, the loss falls."""

from __future__ import annotations

import pytest
import torch
from _training import make_batch, make_ctx

from clipguard import defenses
from clipguard.training.strategy import ClipStrategy

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _loss(strategy, ctx, seed=0):
    strategy.bind(ctx)
    return strategy.loss(make_batch(ctx, seed))


def test_registered_and_options_validated():
    assert "cleanclip" in defenses.names()
    s = defenses.build("cleanclip", {"lambda2": 0.5})
    assert s.opt.lambda2 == 0.5 and s.name == "cleanclip"
    from clipguard.errors import ConfigError

    with pytest.raises(ConfigError, match="no option"):
        defenses.build("cleanclip", {"lambda9": 1})
    with pytest.raises(ConfigError, match="lambda2 must be >= 0"):
        defenses.build("cleanclip", {"lambda2": -1})


def test_lambda2_zero_is_exactly_clip(toy):
    ctx = make_ctx(toy)
    ref, _ = _loss(ClipStrategy(), ctx)
    got, logs = _loss(defenses.build("cleanclip", {"lambda2": 0.0}), ctx)
    assert torch.equal(ref, got)
    assert "inmodal_loss" not in logs


def test_total_is_weighted_sum_and_views_are_seeded(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanclip", {"lambda1": 0.5, "lambda2": 2.0})
    a, la = _loss(s, ctx, seed=3)
    b, lb = _loss(s, ctx, seed=3)
    c, lc = _loss(s, ctx, seed=4)
    assert torch.equal(a, b) and la == lb                         # same step seed, same views
    assert lc["inmodal_loss"] != la["inmodal_loss"]               # new step, fresh views
    assert float(a.detach()) == pytest.approx(0.5 * la["clip_loss"] + 2.0 * la["inmodal_loss"], rel=1e-5)
    assert la["inmodal_loss"] > 0


def test_one_forward_per_step(toy):
    ctx = make_ctx(toy)
    calls = []
    orig = ctx.forward
    ctx.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    _loss(defenses.build("cleanclip", {}), ctx)
    assert len(calls) == 1


def test_losses_fall_over_a_few_steps(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanclip", {"crop_scale_min": 0.5})
    s.bind(ctx)
    opt = torch.optim.AdamW(ctx.model.parameters(), lr=2e-3)
    first = last = None
    for step in range(12):
        loss, logs = s.loss(make_batch(ctx, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or logs
        last = logs
    assert last["clip_loss"] < first["clip_loss"]
    assert last["inmodal_loss"] < first["inmodal_loss"]
