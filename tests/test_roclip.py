"""RoCLIP: pool epochs every K, pool size 2% of the data, and the text tower learns in pool epochs."""

import random
from pathlib import Path

import pytest
import torch
from _trainers import batch_of, set_up

from clipguard import defenses
from clipguard.training.spec import load_preset, resolve_spec
from clipguard.training.trainer import TrainConfig, Trainer

CONFIGS = Path(__file__).parents[1] / "configs"
# The options below test one mechanism each, on RoCLIP's defaults before the twenty-second round
# (configs/roclip-previous.yaml): pool epochs on the paper's schedule, no margin, every pair in the
# plain epochs. A test of one of these options names it.
PREVIOUS = load_preset(CONFIGS / "roclip-previous.yaml")["options"]


def _roclip(opts):
    return defenses.build("roclip", {**PREVIOUS, **opts})


def _built(data, opts, tmp_path):
    return set_up(TrainConfig(model="cg-tiny", epochs=2, batch_size=32, seed=0, device="cpu", quiet=True),
                  data, _roclip(opts), tmp_path)


def _batch(t, idx, seed=5):
    return batch_of(t, idx, seed)


def test_pool_epochs_follow_k_and_pool_is_two_percent(fm_train, tmp_path):
    t = _built(fm_train.subset(range(500)), {"match_every": 3}, tmp_path)
    s = t.strategy
    assert [s.is_pool_epoch(e) for e in range(7)] == [False, False, True, False, False, True, False]
    assert s._pool.size == 10  # 2% of 500


@pytest.mark.parametrize("text_gradient", [True, False])
def test_text_tower_gradient_in_pool_epochs(fm_train, tmp_path, text_gradient):
    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.0,
                                            "text_gradient": text_gradient}, tmp_path)
    s, model = t.strategy, t.model
    t.ctx.epoch = 0
    rec = s.on_epoch_start(0)  # fills the pool with random augmented captions
    assert rec["pool_epoch"] and len(s._pool) == s._pool.size == 64
    loss, _ = s.loss(_batch(t, range(32)))
    loss.backward()
    text = [p for n, p in model.named_parameters() if n.startswith("transformer.") or n == "text_projection"]
    visual = [p for n, p in model.named_parameters() if n.startswith("visual.")]
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in visual)
    text_moved = any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in text)
    assert text_moved == text_gradient  # False reproduces the reference code's frozen text tower


def test_matched_captions_come_from_the_pool(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25}, tmp_path)
    s = t.strategy
    s.on_epoch_start(0)
    before = s._pool.payload.clone()
    s.loss(_batch(t, range(32)))
    # the pool is FIFO: the 32 oldest slots now hold this batch's augmented captions
    assert torch.equal(s._pool.payload[32:], before[32:])
    assert not torch.equal(s._pool.payload[:32], before[:32])


def test_a_pool_step_encodes_each_image_once_and_matches_on_it(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25}, tmp_path)
    s, model = t.strategy, t.model
    s.on_epoch_start(0)
    calls, seen = [], {}
    enc = model.encode_image

    def counted(x, normalize=False):
        out = enc(x, normalize=normalize)
        calls.append(len(x))
        seen["img"] = out.detach()
        return out

    model.encode_image = counted
    bank = s._pool.bank.clone()
    _, logs = s.loss(_batch(t, range(32)))
    assert calls == [32]  # no probe forward: the images of the step's forward pick their captions
    picked = (seen["img"] @ bank.t()).argmax(1)
    expect = float((picked.unsqueeze(1) == picked.unsqueeze(0)).float().sum(1).eq(1).float().mean())
    assert logs["unique_match_fraction"] == pytest.approx(expect)


def test_keep_own_keeps_the_own_caption_only_where_the_pick_agrees(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.1},
               tmp_path)
    s = t.strategy
    s.on_epoch_start(0)
    n = len(s._pool)
    own = s._pool.bank[:4].clone()  # captions identical to pool entries 0-3
    # entry i is its own nearest (rank 0): agrees; the entry farthest from it: rank n-1, disagrees
    far = (own @ s._pool.bank.t()).argmin(1)
    assert s._agrees(own, torch.arange(4)).all()
    assert not s._agrees(own, far).any()
    assert int(0.1 * n) >= 1
    # the step encodes the own tokens for agreeing rows and the pooled tokens for the rest
    seen = {}
    enc = t.model.encode_text

    def spy(tokens, normalize=False):
        seen["tokens"] = tokens.clone()
        return enc(tokens, normalize=normalize)

    t.model.encode_text = spy
    b = _batch(t, range(32))
    _, logs = s.loss(b)
    rows_own = [torch.equal(seen["tokens"][i], t.ctx.tokenize(s._texts(b.captions, random.Random(5)))[i])
                for i in range(32)]
    assert 0.0 <= logs["kept_own_fraction"] <= 1.0
    assert sum(rows_own) == round(logs["kept_own_fraction"] * 32)


def test_keep_own_margin_keeps_pairs_whose_own_caption_is_nearly_as_likely(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.1,
                                             "keep_own_margin": 1.0}, tmp_path)
    s = t.strategy
    s.on_epoch_start(0)
    bank = s._pool.bank[:len(s._pool)]
    img = bank[:3].clone()                                   # each image equals pool entry 0-2
    idx = torch.arange(3)                                    # and picked it (similarity 1)
    rank_far = torch.full((3,), len(s._pool) - 1)            # the rank test says no
    own_near = img.clone()                                   # own caption = the pick: log-odds 0
    scale = torch.tensor(10.0)
    assert s._agreement_now(rank_far, img, own_near, idx, scale).all()
    # own caption with cosine 0.8 to the image: log-odds 10 x 0.2 = 2 nats, above the margin of 1
    ortho = torch.nn.functional.normalize(torch.randn_like(img), dim=1)
    ortho = torch.nn.functional.normalize(ortho - (ortho * img).sum(1, keepdim=True) * img, dim=1)
    own_far = 0.8 * img + 0.6 * ortho
    assert not s._agreement_now(rank_far, img, own_far, idx, scale).any()
    assert s._agreement_now(rank_far, img, own_far, idx, torch.tensor(4.0)).all()  # 0.8 nats
    # without the margin the test is the rank test alone, as before
    s.opt.keep_own_margin = 0.0
    assert not s._agreement_now(rank_far, img, own_near, idx, scale).any()
    assert s._agreement_now(torch.zeros(3, dtype=torch.long), img, own_far, idx, scale).all()


def test_keep_own_margin_trains_and_reports_the_kept_share(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.1,
                                             "keep_own_margin": 50.0}, tmp_path)
    s = t.strategy
    s.on_epoch_start(0)
    loss, logs = s.loss(_batch(t, range(32)))
    loss.backward()
    assert logs["kept_own_fraction"] == 1.0  # 50 nats: every own caption is nearly as likely


def test_keep_own_margin_is_validated():
    with pytest.raises(Exception, match="keep_own_margin"):
        _roclip({"keep_own_margin": -0.5})
    _roclip({"keep_own": 0.0, "keep_own_margin": 1.0, "unmatched": "drop"})


def test_plain_trains_kept_leaves_the_latest_pool_epochs_re_paired_rows_out_of_plain_steps(fm_train, tmp_path):
    from clipguard.training.losses import clip_loss

    t = _built(fm_train.subset(range(256)), {"keep_own": 0.1, "keep_own_margin": 1.0, "plain_trains_kept": True,
                                             "pool_fraction": 0.25}, tmp_path)
    s = t.strategy
    assert s._plain_rows(torch.arange(32), torch.device("cpu")) is None  # no pool epoch yet: every row
    t.ctx.epoch = 1
    assert s.is_pool_epoch(1)
    s.on_epoch_start(1)
    s.loss(_batch(t, range(32)))
    kept = s._kept[:32].clone()
    assert 0 < int(kept.sum()) < 32
    t.ctx.epoch = 2
    assert not s.is_pool_epoch(2)
    rows = s._plain_rows(torch.arange(64), torch.device("cpu"))
    assert torch.equal(rows[:32], kept) and rows[32:].all()  # rows the pool epoch did not reach train
    # the plain step's loss is CLIP's on those rows
    b = _batch(t, range(32))
    loss, _ = s.loss(b)
    with torch.no_grad():
        img, txt, scale = t.ctx.forward(s._images(_batch(t, range(32))),
                                        t.ctx.tokenize(s._texts(b.captions, random.Random(5))))
        assert float(loss.detach()) == pytest.approx(float(clip_loss(img, txt, scale, mask=kept)), rel=1e-5)
    # the decisions survive a resume
    fresh = _roclip(dict(s.opt.to_dict()))
    fresh.bind(t.ctx)
    fresh.load_state(s.state_tensors(), s.state_json())
    assert torch.equal(fresh._plain_rows(torch.arange(64), torch.device("cpu")), rows)
    with pytest.raises(Exception, match="plain_trains_kept"):
        _roclip({"keep_own": 0.0, "plain_trains_kept": True})
    # with plain_negatives the left-out images are extra negatives of the kept captions
    s.opt.plain_negatives = True
    loss, _ = s.loss(_batch(t, range(32)))  # the same views as above
    with torch.no_grad():
        want = clip_loss(img, txt, scale, mask=kept, negatives=~kept)
        assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(Exception, match="plain_negatives"):
        _roclip({"plain_negatives": True})


def test_keep_own_is_validated():
    with pytest.raises(Exception, match="keep_own"):
        _roclip({"keep_own": 1.0})


def test_the_diagnostics_see_the_latest_pool_epochs_matching(fm_train, tmp_path):
    from clipguard.evaluation.detection import poison_diagnostics

    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.1},
               tmp_path)
    s = t.strategy
    t.ctx.epoch = 0
    s.on_epoch_start(0)
    assert s.pair_scores() is None and s.selected() is None  # nothing matched yet
    _, logs = s.loss(_batch(t, range(32)))
    assert s.pair_scores() is None  # the pool epoch is not finished
    t.ctx.epoch = 1
    scores, kept = s.pair_scores(), s.selected()
    assert scores.shape == (256,) and not scores.isnan().any() and ((scores >= 0) & (scores <= 1)).all()
    assert int(kept[:32].sum()) == round(logs["kept_own_fraction"] * 32) and not kept[32:].any()
    poisoned = torch.zeros(256, dtype=torch.bool)
    poisoned[:8] = True
    rec = poison_diagnostics(poisoned, histograms=False)(s, 1, tmp_path)
    assert rec["similarity_auroc"] is not None and rec["safe_poison_count"] == int(kept[:8].sum())
    s.loss(_batch(t, range(32, 64)))  # the next pool epoch starts its records afresh
    assert not s._kept[:32].any() and s._agreement[:32].isnan().all()


def test_balanced_assignment_spreads_a_hub_and_keeps_a_clear_match():
    from clipguard.defenses.roclip import balanced_assignment

    g = torch.Generator().manual_seed(0)
    sims = 0.05 * torch.randn(64, 64, generator=g)
    sims[:, 0] += 0.3  # one hub caption every image prefers
    assert sims.argmax(1).eq(0).all()
    picked = balanced_assignment(sims)
    assert picked.eq(0).sum() <= 4 and picked.unique().numel() > 32
    clear = torch.eye(16) + 0.01 * torch.randn(16, 16, generator=g)
    assert torch.equal(balanced_assignment(clear), torch.arange(16))


def test_a_balanced_pool_step_spreads_the_picks(fm_train, tmp_path):
    unique = {}
    for assignment in ("nearest", "balanced"):
        t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25,
                                                "assignment": assignment}, tmp_path / assignment)
        t.strategy.on_epoch_start(0)
        loss, logs = t.strategy.loss(_batch(t, range(32)))
        assert torch.isfinite(loss)
        unique[assignment] = logs["unique_match_fraction"]
    assert unique["balanced"] > unique["nearest"] + 0.1


def test_frozen_pool_captions_with_keep_own_train_the_text_tower_only_through_kept_pairs(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.5,
                                            "text_gradient": False}, tmp_path)
    s = t.strategy
    t.ctx.epoch = 0
    s.on_epoch_start(0)
    loss, logs = s.loss(_batch(t, range(32)))
    loss.backward()
    text = [p for n, p in t.model.named_parameters() if n.startswith("transformer.")]
    moved = any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in text)
    assert moved == (logs["kept_own_fraction"] > 0)


def test_grouped_clip_loss_is_clip_loss_without_shared_captions():
    from clipguard.training.losses import clip_loss, grouped_clip_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=1)
    scale = torch.tensor(10.0)
    assert torch.equal(grouped_clip_loss(img, txt, scale, torch.arange(8) * 3), clip_loss(img, txt, scale))


def test_grouped_clip_loss_classifies_among_distinct_captions():
    """Rows 0, 2 and 3 share one caption: it is one class, not a negative of its own images."""
    from clipguard.training.losses import grouped_clip_loss

    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1).requires_grad_()
    caps = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    groups = torch.tensor([7, 1, 7, 7, 4])
    txt = caps[torch.tensor([0, 1, 0, 0, 2])].clone().requires_grad_()
    scale = torch.tensor(5.0)
    loss = grouped_clip_loss(img, txt, scale, groups)
    # by hand: distinct captions in sorted id order (1, 4, 7) -> caps 1, 2, 0
    distinct = caps[torch.tensor([1, 2, 0])]
    target = torch.tensor([2, 0, 2, 2, 1])
    logits = scale * img.detach() @ distinct.t()
    i2t = torch.nn.functional.cross_entropy(logits, target)
    members = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [1, 0, 1, 1, 0]], dtype=torch.float32)
    t2i = -(members / members.sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1).mean()
    assert loss.item() == pytest.approx(float(0.5 * (i2t + t2i)), rel=1e-6)
    loss.backward()
    assert all(float(txt.grad[i].abs().sum()) > 0 for i in range(5))  # every copy of a caption learns


def test_pool_duplicates_merge_runs_a_pool_step_and_is_validated(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.05,
                                            "pool_duplicates": "merge"}, tmp_path)
    t.strategy.on_epoch_start(0)
    loss, logs = t.strategy.loss(_batch(t, range(64)))
    assert torch.isfinite(loss) and logs["unique_match_fraction"] < 1.0  # 13 pooled captions, 64 images
    loss.backward()
    from clipguard.errors import ConfigError

    with pytest.raises(ConfigError, match="'pool_duplicates' must be one of 'separate', 'merge'"):
        _roclip({"pool_duplicates": "both"})


def test_unmatched_drop_trains_a_pool_step_on_the_agreeing_pairs_only(fm_train, tmp_path):
    from clipguard.training.losses import clip_loss

    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.5,
                                            "unmatched": "drop"}, tmp_path)
    s, model = t.strategy, t.model
    s.on_epoch_start(0)
    seen = {}
    enc_i, enc_t = model.encode_image, model.encode_text

    def spy_i(x, normalize=False):
        seen["img"] = enc_i(x, normalize=normalize)
        return seen["img"]

    def spy_t(tokens, normalize=False):
        seen["txt"] = enc_t(tokens, normalize=normalize)
        seen.setdefault("texts", []).append(tokens.clone())
        return seen["txt"]

    model.encode_image, model.encode_text = spy_i, spy_t
    b = _batch(t, range(32))
    own = t.ctx.tokenize(s._texts(b.captions, random.Random(5)))
    loss, logs = s.loss(b)
    kept = s._kept[:32]
    assert 0 < int(kept.sum()) < 32  # some pairs agree, some do not
    # one text encode, of the batch's own captions: the pool, the test and the loss all read it
    assert len(seen["texts"]) == 1 and torch.equal(seen["texts"][0], own)
    pushed = seen["txt"].detach().float()
    assert bool(((pushed @ s._pool.bank.t()).max(1).values > 1 - 1e-5).all())  # the pool holds them
    expect = clip_loss(seen["img"].float()[kept], seen["txt"].float()[kept], model.logit_scale.exp().float())
    assert float(loss.detach()) == pytest.approx(float(expect.detach()), rel=1e-5)
    assert logs["kept_own_fraction"] == pytest.approx(float(kept.float().mean()))


def test_unmatched_drop_and_flip_p_are_validated():
    from clipguard.errors import ConfigError

    with pytest.raises(ConfigError, match="needs keep_own > 0"):
        _roclip({"unmatched": "drop", "keep_own": 0.0})
    with pytest.raises(ConfigError, match="pool_duplicates must stay 'separate'"):
        _roclip({"unmatched": "drop", "pool_duplicates": "merge"})
    with pytest.raises(ConfigError, match="flip_p"):
        _roclip({"flip_p": 1.5})


def test_flip_p_zero_never_mirrors_a_view():
    from clipguard.data.augment.views import Views

    x = torch.rand(16, 3, 8, 8)
    a = Views(crop_scale_min=1.0, flip_p=0.0).images(x, torch.Generator().manual_seed(0), geometric_only=True)
    b = Views(crop_scale_min=1.0, flip_p=1.0).images(x, torch.Generator().manual_seed(0), geometric_only=True)
    # a full-size crop (up to the aspect-ratio draw) either keeps the orientation or mirrors every row
    assert (a - x).abs().mean() < 0.5 * (b - x).abs().mean()


def test_pool_start_delays_the_first_pool_epoch_by_a_share_of_the_budget(fm_train, tmp_path):
    t = Trainer(TrainConfig(model="cg-tiny", epochs=10, batch_size=32, seed=0, device="cpu", quiet=True),
                fm_train.subset(range(200)), tmp_path, strategy=_roclip({"pool_start": 0.3}))
    t.setup()
    # 3 plain epochs, then every 2nd: epochs 5, 7, 9 (counted from 1)
    assert [e + 1 for e in range(10) if t.strategy.is_pool_epoch(e)] == [5, 7, 9]
    with pytest.raises(Exception, match="pool_start"):
        _roclip({"pool_start": 1.0})


def test_align_before_pool_trains_a_pool_epoch_plain_until_the_model_leaves_chance(fm_train, tmp_path):
    import math

    t = Trainer(TrainConfig(model="cg-tiny", epochs=10, batch_size=32, seed=0, device="cpu", quiet=True),
                fm_train.subset(range(200)), tmp_path, strategy=_roclip({"align_before_pool": 0.97}))
    t.setup()
    s = t.strategy
    chance = math.log(32)
    assert [e + 1 for e in range(10) if s.scheduled_pool_epoch(e)] == [2, 4, 6, 8, 10]
    s._plain.reset()
    s._plain.add(0.99 * chance)                   # epoch 1 ended near chance: epoch 2 is trained plain
    rec = s.on_epoch_start(1)
    assert rec["pool_deferred"] and rec["pool_epoch"] is False and not s.is_pool_epoch(1)
    assert rec["plain_loss_vs_chance"] == pytest.approx(0.99)
    assert s._plain.steps == 0                    # the deferred epoch's own losses count next time
    s._plain.add(0.98 * chance)                   # epoch 2, trained plain
    assert s.on_epoch_start(2)["pool_epoch"] is False  # not a scheduled pool epoch: nothing decided
    assert s._plain.steps == 0                    # a plain epoch starts its own mean
    s._plain.add(0.90 * chance)                   # epoch 3 left chance
    rec = s.on_epoch_start(3)
    assert rec["pool_epoch"] is True and "pool_deferred" not in rec and s._aligned_at == 3
    # from then on the schedule runs as set, whatever the loss
    s._plain.add(0.99 * chance)
    assert [e + 1 for e in range(10) if s.is_pool_epoch(e)] == [4, 6, 8, 10]
    # the decision survives a resume
    meta = s.state_json()
    fresh = _roclip({"align_before_pool": 0.97})
    fresh.bind(t.ctx)
    fresh.load_state(s.state_tensors(), meta)
    assert fresh._aligned_at == 3 and fresh._plain.state() == s._plain.state()
    assert [e + 1 for e in range(10) if fresh.is_pool_epoch(e)] == [4, 6, 8, 10]
    # without the option nothing is held back and nothing extra is saved
    off = Trainer(TrainConfig(model="cg-tiny", epochs=10, batch_size=32, seed=0, device="cpu", quiet=True),
                  fm_train.subset(range(200)), tmp_path / "off", strategy=_roclip({}))
    off.setup()
    off.strategy._plain.add(0.99 * chance)
    assert off.strategy.on_epoch_start(1)["pool_epoch"] is True and off.strategy.state_json() == {}
    with pytest.raises(Exception, match="align_before_pool"):
        _roclip({"align_before_pool": 1.5})


def test_align_before_pool_holds_back_a_first_pool_epoch_with_no_plain_epoch_before(fm_train, tmp_path):
    t = _built(fm_train.subset(range(200)), {"match_every": 1, "align_before_pool": 0.97}, tmp_path)
    s = t.strategy
    rec = s.on_epoch_start(0)  # K = 1: epoch 1 is scheduled, and a fresh model is at chance
    assert rec["pool_deferred"] and rec["plain_loss_vs_chance"] is None and not s.is_pool_epoch(0)


def test_a_pool_epoch_after_a_plain_epoch_at_chance_is_reported_and_warned_once(fm_train, tmp_path, caplog):
    import logging
    import math

    t = _built(fm_train.subset(range(256)), {"match_every": 2}, tmp_path)
    s = t.strategy
    chance = math.log(32)
    s.on_epoch_start(0)
    s._plain.add(chance)
    s._plain.add(chance)  # a plain epoch at chance
    with caplog.at_level(logging.WARNING, logger="clipguard"):
        rec = s.on_epoch_start(1)
        assert rec["pool_epoch"] and rec["plain_loss_vs_chance"] == pytest.approx(1.0)
        s._plain.add(0.99 * chance)
        assert s.on_epoch_start(3)["plain_loss_vs_chance"] == pytest.approx(0.99, abs=1e-3)
    assert sum("near chance" in r.getMessage() for r in caplog.records) == 1  # once per run
    s._plain.add(1.0)
    assert "plain_loss_vs_chance" not in s.on_epoch_start(2)  # a plain epoch: nothing to check
    assert "plain_loss_vs_chance" not in s.on_epoch_start(3)  # its loss was measured afresh: none yet


def test_a_pool_epoch_after_a_model_that_learnt_is_not_warned(fm_train, tmp_path, caplog):
    import logging
    import math

    t = _built(fm_train.subset(range(256)), {"match_every": 2}, tmp_path)
    s = t.strategy
    s._plain.add(0.5 * math.log(32))
    with caplog.at_level(logging.WARNING, logger="clipguard"):
        assert s.on_epoch_start(1)["plain_loss_vs_chance"] == pytest.approx(0.5)
    assert not any("near chance" in r.getMessage() for r in caplog.records)


def test_a_keep_own_streak_keeps_the_own_caption_only_after_agreeing_pool_epochs_in_a_row(fm_train, tmp_path):
    opts = {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.3}
    t = _built(fm_train.subset(range(256)), {**opts, "keep_own_streak": 2}, tmp_path)
    s = t.strategy
    t.ctx.epoch = 0
    s.on_epoch_start(0)
    b = _batch(t, range(32))
    _, logs = s.loss(b)
    agreed = s._agreed[:32].clone()
    assert agreed.any() and logs["kept_own_fraction"] == 0.0  # the first pool epoch: no streak yet
    rec = s.on_epoch_end(0)
    assert torch.equal(s._streak[:32], agreed.long()) and not s._streak[32:].any()  # unseen pairs keep 0
    assert rec["keep_own_streak_met"] == 0.0
    t.ctx.epoch = 1
    s.on_epoch_start(1)
    _, logs = s.loss(b)
    kept = s._kept[:32]
    assert torch.equal(kept, s._agreed[:32] & agreed)  # kept now = agreed now and in the pool epoch before
    assert logs["kept_own_fraction"] == pytest.approx(float(kept.float().mean()))
    s.on_epoch_end(1)
    assert torch.equal(s._streak[:32], torch.where(s._agreed[:32], agreed.long() + 1, 0))
    # the streaks travel with the checkpoint, so a resumed run keeps them
    again = _built(fm_train.subset(range(256)), {**opts, "keep_own_streak": 2}, tmp_path / "resumed")
    again.strategy.load_state(s.state_tensors(), {})
    assert torch.equal(again.strategy._streak, s._streak)
    assert "keep_own_streak" not in _built(fm_train.subset(range(256)), opts, tmp_path / "plain").strategy.state_tensors()


def test_keep_own_streak_is_validated():
    with pytest.raises(Exception, match="keep_own_streak must be >= 1"):
        _roclip({"keep_own_streak": 0})
    with pytest.raises(Exception, match="keep_own_streak needs keep_own > 0"):
        _roclip({"keep_own_streak": 2, "keep_own": 0.0})


def test_plain_keep_trains_a_plain_step_on_its_lowest_loss_pairs(fm_train, tmp_path):
    """With plain_keep a plain step's loss is the CLIP loss of the share of its pairs with the
    lowest own loss (on the same augmented views); the log and the alignment gate read the whole
    batch's loss."""
    from clipguard.errors import ConfigError
    from clipguard.training.losses import clip_loss, lowest_loss_rows

    t = _built(fm_train.subset(range(256)), {"match_every": 1000, "plain_keep": 0.5}, tmp_path)
    s = t.strategy
    s.on_epoch_start(0)
    assert not s.is_pool_epoch(0)
    batch = _batch(t, range(32))
    loss, logs = s.loss(batch)
    again = _batch(t, range(32))  # the same seeded views
    with torch.no_grad():
        img, txt, scale = t.ctx.forward(s._images(again), t.ctx.tokenize(s._texts(again.captions, again.rng)))
        rows, whole = lowest_loss_rows(img, txt, scale, 0.5)
        assert int(rows.sum()) == 16
        assert float(loss) == pytest.approx(float(clip_loss(img, txt, scale, mask=rows)), rel=1e-5)
    assert logs["clip_loss"] == pytest.approx(float(whole), rel=1e-5) and logs["kept_clip_loss"] < logs["clip_loss"]
    with pytest.raises(ConfigError, match="plain_keep must be in"):
        _roclip({"plain_keep": 0.0})


def test_the_defaults_wait_for_alignment_keep_near_misses_and_train_only_kept_pairs():
    """The twenty-second, twenty-fourth and twenty-fifth validation rounds' defaults (docs/roclip-selection.md)."""
    opt = defenses.build("roclip", {}).opt
    assert (opt.align_before_pool, opt.keep_own_margin, opt.plain_trains_kept) == (0.97, 1.0, True)
    assert opt.unmatched == "drop" and opt.plain_views == "original-after-pool"
    assert (opt.keep_own, opt.crop_scale_min) == (0.1, 0.5)
    assert opt.pattern_z == 4.0  # the twenty-seventh round


@pytest.mark.parametrize("preset", ["roclip-previous", "roclip", "roclip-small", "augclip-screen"])
def test_presets_written_before_the_new_defaults_keep_their_fingerprint(preset):
    """Each preset writes the six options out at their neutral values, so the runs and bench
    cells made with it before the defaults changed stay valid (and do what they did)."""
    spec = resolve_spec(preset=str(CONFIGS / f"{preset}.yaml"))
    ident = spec.options.identity()
    assert not {"align_before_pool", "keep_own_margin", "plain_trains_kept", "unmatched", "plain_views",
                "pattern_z"} & set(ident)


def test_without_pool_epochs_the_new_defaults_train_the_same_weights(fm_train, tmp_path):
    """align_before_pool, keep_own_margin, plain_trains_kept, unmatched and plain_views act only in or after pool epochs:
    RoCLIP with no pool epoch in its budget (the augmented-CLIP screen) is what it was."""
    data = fm_train.subset(range(128))
    weights = []
    for i, opts in enumerate([{"match_every": 1000}, {**PREVIOUS, "match_every": 1000}]):
        t = Trainer(TrainConfig(model="cg-tiny", epochs=2, batch_size=32, seed=0, device="cpu", quiet=True),
                    data, tmp_path / str(i), strategy=defenses.build("roclip", opts))
        t.fit()
        weights.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_todays_defaults_are_the_crop_preset_with_the_flags_unlearnt():
    """configs/roclip-align.yaml writes out the twenty-second round's defaults,
    configs/roclip-drop.yaml the twenty-fourth's (the same with ``unmatched: drop``),
    configs/roclip-views.yaml the twenty-fifth's (roclip-drop with ``plain_views:
    original-after-pool``) and configs/roclip-veto.yaml the twenty-seventh's (roclip-views with
    ``pattern_z: 4``) and configs/roclip-text.yaml the twenty-eighth's (roclip-veto with
    ``pattern_text: pool-epoch``), configs/roclip-crop.yaml the twenty-ninth's (roclip-text with
    ``pool_crop_scale_min: 1.0``); the thirty-first changed one option, so a run of ``--defense roclip``
    with no options is a run of roclip-crop with ``pattern_unlearn: 0.02`` (the same fingerprint)."""
    align = resolve_spec(preset=str(CONFIGS / "roclip-align.yaml"))
    drop = resolve_spec(preset=str(CONFIGS / "roclip-drop.yaml"))
    assert (align.options.unmatched, align.options.plain_views) == ("pooled", "augmented")
    assert resolve_spec(preset=str(CONFIGS / "roclip-align.yaml"), options={"unmatched": "drop"}).options.identity() \
        == drop.options.identity()
    views = resolve_spec(preset=str(CONFIGS / "roclip-views.yaml"))
    assert resolve_spec(preset=str(CONFIGS / "roclip-drop.yaml"), options={"plain_views": "original-after-pool"}
                        ).options.identity() == views.options.identity()
    assert "pattern_z" not in views.options.identity() and "pattern_z" not in drop.options.identity()
    # the twenty-seventh round turned the pattern veto on at 4 (the veto as it then was)
    veto = resolve_spec(preset=str(CONFIGS / "roclip-veto.yaml"))
    assert resolve_spec(preset=str(CONFIGS / "roclip-views.yaml"), options={"pattern_z": 4.0}
                        ).options.identity() == veto.options.identity()
    assert "pattern_text" not in veto.options.identity()  # encode: the value the earlier runs had
    # the twenty-eighth round let it group the captions by the pool epoch's embeddings
    text = resolve_spec(preset=str(CONFIGS / "roclip-text.yaml"))
    assert resolve_spec(preset=str(CONFIGS / "roclip-veto.yaml"), options={"pattern_text": "pool-epoch"}
                        ).options.identity() == text.options.identity()
    # every preset before the twenty-ninth round crops the pool epochs' views as every view
    for name in ("roclip", "roclip-small", "roclip-previous", "roclip-align", "roclip-drop", "roclip-views",
                 "roclip-veto", "roclip-text"):
        assert resolve_spec(preset=str(CONFIGS / f"{name}.yaml")).options.pool_crop_scale_min is None, name
    # the twenty-ninth round stopped cropping them (configs/roclip-crop.yaml)
    crop = resolve_spec(preset=str(CONFIGS / "roclip-crop.yaml"))
    assert resolve_spec(preset=str(CONFIGS / "roclip-text.yaml"), options={"pool_crop_scale_min": 1.0}
                        ).options.identity() == crop.options.identity()
    # every preset before the thirty-first round has no unlearning term; that round added it at 0.02
    for name in ("roclip", "roclip-small", "roclip-previous", "roclip-align", "roclip-drop", "roclip-views",
                 "roclip-veto", "roclip-text", "roclip-crop"):
        assert resolve_spec(preset=str(CONFIGS / f"{name}.yaml")).options.pattern_unlearn is None, name
    assert resolve_spec(preset=str(CONFIGS / "roclip-crop.yaml"), options={"pattern_unlearn": 0.02}
                        ).options.identity() == resolve_spec(defense="roclip").options.identity()


@pytest.mark.parametrize("views", ["original", "original-after-pool", "original-captions-after-pool",
                                   "geometric-after-pool"])
def test_plain_views_train_plain_steps_on_the_pairs_as_given(fm_train, tmp_path, views):
    """With plain_views a plain step encodes the batch's own images and captions, not SimCLR/EDA
    views ("...-after-pool": only once a pool epoch has run; "original-captions-after-pool": the
    captions only); pool steps still augment, and the after-pool switch survives a resume."""
    from clipguard.training.losses import clip_loss

    t = _built(fm_train.subset(range(256)), {"keep_own": 0.1, "plain_views": views, "pool_fraction": 0.25},
               tmp_path)
    s = t.strategy
    after_pool = views.endswith("-after-pool")
    before = ("simclr", True) if after_pool else ("none", False)
    images_after = {"original-captions-after-pool": "simclr", "geometric-after-pool": "geometric"}.get(views, "none")

    def plain_loss_on(images: str, captions: bool) -> float:
        b = _batch(t, range(32))
        if images == "geometric":
            pixels = s._views.images(b.pixels, b.generator, geometric_only=True)
        else:
            pixels = s._views.images(b.pixels, b.generator) if images == "simclr" else b.pixels
        caps = s._texts(b.captions, b.rng) if captions else list(b.captions)
        with torch.no_grad():
            img, txt, scale = t.ctx.forward(pixels, t.ctx.tokenize(caps))
            return float(clip_loss(img, txt, scale))

    t.ctx.epoch = 0
    assert not s.is_pool_epoch(0)
    loss, _ = s.loss(_batch(t, range(32)))
    assert float(loss.detach()) == pytest.approx(plain_loss_on(*before), rel=1e-5)
    t.ctx.epoch = 1
    s.on_epoch_start(1)
    assert s.is_pool_epoch(1)
    s.loss(_batch(t, range(32)))
    t.ctx.epoch = 2
    assert s._plain_views() == (images_after, False)
    loss, _ = s.loss(_batch(t, range(32)))
    assert float(loss.detach()) == pytest.approx(plain_loss_on(images_after, False), rel=1e-5)
    fresh = _roclip(dict(s.opt.to_dict()))
    fresh.bind(t.ctx)
    assert fresh._plain_views() == before
    fresh.load_state(s.state_tensors(), s.state_json())
    assert fresh._plain_views() == (images_after, False)


def test_plain_views_default_keeps_the_fingerprint_and_is_validated():
    from clipguard.errors import ConfigError

    assert "plain_views" not in resolve_spec(preset=str(CONFIGS / "roclip-drop.yaml")).options.identity()
    with pytest.raises(ConfigError, match="plain_views"):
        _roclip({"plain_views": "clean"})


def test_a_drop_pool_step_trains_what_the_staged_step_with_a_separate_caption_encode_trains(fm_train, tmp_path):
    """Under unmatched: drop a pool step encodes the own captions once, with gradient; the staged
    forward it replaced encoded them without gradient for the test and then the kept captions (and
    the dropped rows' picks) with gradient. Same picks, same loss, same gradients, bit for bit."""
    from clipguard.training.losses import clip_loss

    t = _built(fm_train.subset(range(256)), {"match_every": 1, "pool_fraction": 0.25, "keep_own": 0.1,
                                            "keep_own_margin": 1.0, "unmatched": "drop"}, tmp_path)
    s, model = t.strategy, t.model
    s.on_epoch_start(0)
    grads = []
    for staged in (False, True):
        b = _batch(t, range(32))
        if staged:
            pixels = s._images(b)
            tokens = t.ctx.tokenize(s._texts(b.captions, b.rng))
            own = t.ctx.encode_views(tokens=tokens)[1]
            img, txt, scale, _, _, _, kept = s._pool_forward(b, pixels, tokens, own)
            loss = clip_loss(img, txt, scale, t.ctx.dist, mask=kept)
        else:
            bank = s._pool.bank.clone()
            loss, _ = s.loss(b)
            kept_first = s._kept[:32].clone()
            s._pool.bank.copy_(bank)  # the step pushed its captions: the staged step picks from the same pool
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert 0 < int(kept_first.sum()) < 32 and torch.equal(kept.cpu(), kept_first)
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_pool_crop_scale_min_sets_the_pool_epochs_crop_only(fm_train, tmp_path):
    from clipguard.data.augment.image import simclr_augment
    from clipguard.errors import ConfigError

    t = _built(fm_train.subset(range(200)), {"pool_crop_scale_min": 0.9}, tmp_path)
    s = t.strategy
    batch = _batch(t, torch.arange(16))
    state = batch.generator.get_state()
    pool = s._images(batch, pool_epoch=True)
    batch.generator.set_state(state)
    plain = s._images(batch)
    for got, scale in ((pool, 0.9), (plain, s.opt.crop_scale_min)):
        want = simclr_augment(batch.pixels, torch.Generator().set_state(state), scale=(scale, 1.0),
                              flip_p=s.opt.flip_p)
        assert torch.equal(got, want)
    assert not torch.equal(pool, plain)
    # unset, every view has crop_scale_min and the option stays out of a run's identity
    assert _roclip({}).opt.identity() == _roclip({"pool_crop_scale_min": None}).opt.identity()
    assert "pool_crop_scale_min" not in _roclip({}).opt.identity()
    unset = _roclip({})
    assert unset._pool_views is unset._views
    with pytest.raises(ConfigError, match="pool_crop_scale_min"):
        _roclip({"pool_crop_scale_min": 0.0})
