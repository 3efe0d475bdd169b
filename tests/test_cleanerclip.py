"""CleanerCLIP: the L_fc form, exact reduction to CLIP, seeded subsets, the loss falls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipguard import defenses
from clipguard.defenses.cleanerclip import factual_counterfactual_loss
from clipguard.training.strategy import ClipStrategy
from tests.test_cleanclip import make_batch, make_ctx

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_fc_loss_matches_the_reference_formula():
    img, pos, neg = _unit(3, 8, seed=1), _unit(3, 8, seed=2), _unit(3, 8, seed=3)
    tp, tn = 0.3, 0.5
    l_img = l_txt = 0.0
    for i in range(3):
        p = math.exp(float(img[i] @ pos[i]) / tp)
        l_img += -math.log(p / (p + sum(math.exp(float(img[i] @ neg[j]) / tn) for j in range(3))))
        l_txt += -math.log(p / (p + sum(math.exp(float(pos[i] @ img[j]) / tn) for j in range(3) if j != i)))
    want = 0.5 * (l_img / 3 + l_txt / 3)
    assert float(factual_counterfactual_loss(img, pos, neg, tp, tn)) == pytest.approx(want, rel=1e-5)
    # a single sample has no other images: its text term is zero
    one = factual_counterfactual_loss(img[:1], pos[:1], neg[:1], tp, tn)
    p = math.exp(float(img[0] @ pos[0]) / tp)
    assert float(one) == pytest.approx(0.5 * -math.log(p / (p + math.exp(float(img[0] @ neg[0]) / tn))), rel=1e-5)
    assert float(factual_counterfactual_loss(img[:0], pos[:0], neg[:0], tp, tn)) == 0.0


def test_lambda2_lambda3_zero_is_exactly_clip(toy):
    ctx = make_ctx(toy)
    ref = ClipStrategy()
    ref.bind(ctx)
    want, _ = ref.loss(make_batch(ctx, 0))
    s = defenses.build("cleanerclip", {"lambda2": 0.0, "lambda3": 0.0})
    s.bind(ctx)
    s.on_epoch_start(0)
    got, logs = s.loss(make_batch(ctx, 0))
    assert torch.equal(want, got) and "fc_loss" not in logs


def test_epoch_subset_is_seeded_sized_and_fresh(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanerclip", {"fc_samples": 10})
    s.bind(ctx)
    rec = s.on_epoch_start(0)
    rows0, pos0, neg0 = s._row.clone(), list(s._pos), list(s._neg)
    assert 0 < rec["fc_subset"] <= 10 and len(pos0) == rec["fc_subset"]
    s.on_epoch_start(0)
    assert torch.equal(rows0, s._row) and pos0 == s._pos and neg0 == s._neg  # resume rebuilds it
    s.on_epoch_start(1)
    assert not torch.equal(rows0, s._row)                                    # a new draw per epoch
    frac = defenses.build("cleanerclip", {"fc_samples": 0.5})
    frac.bind(ctx)
    assert frac._subset_size() == 16


def test_total_is_weighted_sum(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanerclip", {"fc_samples": 32, "lambda1": 1.0, "lambda2": 0.5, "lambda3": 2.0})
    s.bind(ctx)
    s.on_epoch_start(0)
    loss, logs = s.loss(make_batch(ctx, 0))
    assert logs["fc_rows"] > 16
    assert float(loss.detach()) == pytest.approx(logs["clip_loss"] + 0.5 * logs["inmodal_loss"] + 2.0 * logs["fc_loss"],
                                        rel=1e-5)


def test_per_step_mode_is_seeded(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanerclip", {"fc_per_step": 8})
    s.bind(ctx)
    s.on_epoch_start(0)
    rows, pos, neg = s._batch_subcaptions(make_batch(ctx, 5))
    rows2, pos2, neg2 = s._batch_subcaptions(make_batch(ctx, 5))
    assert 0 < len(rows) <= 8 and rows.tolist() == rows2.tolist() and pos == pos2 and neg == neg2
    assert all(p != n for p, n in zip(pos, neg))


def test_losses_fall_over_a_few_steps(toy):
    ctx = make_ctx(toy)
    s = defenses.build("cleanerclip", {"fc_samples": 32, "crop_scale_min": 0.5})
    s.bind(ctx)
    s.on_epoch_start(0)
    opt = torch.optim.AdamW(ctx.model.parameters(), lr=2e-3)
    hist = []
    for step in range(12):
        loss, logs = s.loss(make_batch(ctx, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(logs)
    for key in ("clip_loss", "inmodal_loss", "fc_loss"):
        assert hist[-1][key] < hist[0][key], key
