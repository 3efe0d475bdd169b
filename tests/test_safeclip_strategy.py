"""SafeCLIP as a trainer strategy: lr across phases, tower isolation, determinism, diagnostics."""

import json
import random

import pytest
import torch
from _trainers import batch_of, set_up
from safetensors.torch import load_file

from clipguard import defenses
from clipguard.defenses.nn_pool import nn_self_loss
from clipguard.errors import ConfigError
from clipguard.training.losses import clip_loss
from clipguard.training.trainer import TrainConfig, Trainer


def _cfg(**kw):
    base = dict(model="cg-tiny", epochs=3, batch_size=64, lr=1e-3, warmup=2, seed=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def _small(**kw):
    opts = dict(warmup_epochs=1, clip_warmup_epochs=1, lr_low_factor=0.1, min_initial_fraction=0.3,
                step=0.2, pool_size=128, density_z=None, risky_negatives=False, pattern_z=None)
    opts.update(kw)
    return defenses.build("safeclip", opts)


def _built(data, strategy, tmp_path, **kw):
    return set_up(_cfg(**kw), data, strategy, tmp_path)


def _batch(t, idx, seed=7):
    return batch_of(t, idx, seed)


def test_lr_schedule_is_right_across_phases(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), _small(warmup_epochs=2, lr_low=5e-6, lr_low_factor=None),
               tmp_path, epochs=6, warmup=3)
    spe = t.ctx.steps_per_epoch
    lrs = [t.schedule.lr_at(s) for s in range(6 * spe)]
    uni, low, mixed = lrs[: 2 * spe], lrs[2 * spe: 3 * spe], lrs[3 * spe:]
    assert uni[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3]) and all(x == 1e-3 for x in uni[3:])
    assert all(x == 5e-6 for x in low)
    assert mixed[0] == pytest.approx(1e-3)
    assert all(b <= a for a, b in zip(mixed, mixed[1:])), "lr rose again inside the mixed phase"
    assert mixed[-1] == pytest.approx(0.0) and min(mixed) >= 0.0


def test_the_mixed_phase_may_start_above_the_base_lr(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), _small(warmup_epochs=0, lr_low_factor=1.0, mixed_lr_factor=3.0), tmp_path, epochs=3, warmup=3)
    spe = t.ctx.steps_per_epoch
    lrs = [t.schedule.lr_at(s) for s in range(3 * spe)]
    assert max(lrs[:spe]) == pytest.approx(1e-3) and lrs[spe] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="mixed_lr_factor must be > 0"):
        _small(mixed_lr_factor=0.0)


@pytest.mark.parametrize("clip_lr_warmup", [False, True])
def test_without_unimodal_epochs_the_warmup_opens_the_clip_epochs_or_the_mixed_phase(fm_train, tmp_path,
                                                                                   clip_lr_warmup):
    t = _built(fm_train.subset(range(256)),
               _small(warmup_epochs=0, lr_low_factor=1.0, clip_lr_warmup=clip_lr_warmup),
               tmp_path, epochs=3, warmup=3)
    spe = t.ctx.steps_per_epoch
    lrs = [t.schedule.lr_at(s) for s in range(3 * spe)]
    clip, mixed = lrs[:spe], lrs[spe:]
    ramp = pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    if clip_lr_warmup:
        assert clip[:3] == ramp and all(x == 1e-3 for x in clip[3:])
        assert mixed[0] == pytest.approx(1e-3), "the mixed phase warmed up a second time"
    else:
        assert all(x == 1e-3 for x in clip)
        assert mixed[:3] == ramp
    assert all(b <= a for a, b in zip(mixed[3:], mixed[4:]))


def test_clip_epochs_before_the_split_can_train_on_augmented_pairs(fm_train, tmp_path):
    losses = {}
    for crop in (None, 0.5):
        t = _built(fm_train.subset(range(256)), _small(warmup_epochs=0, clip_warmup_crop_min=crop),
                   tmp_path / str(crop), epochs=3)
        t.ctx.epoch = 0
        assert t.strategy.phase(0) == "clip_low"
        losses[crop] = [float(t.strategy.loss(_batch(t, range(32), seed=s))[0].detach()) for s in (1, 1, 2)]
    plain, views = losses[None], losses[0.5]
    assert plain[0] == plain[1] == plain[2], "the plain CLIP epoch drew views"
    assert views[0] == views[1] != views[2], "the views are not drawn from the step's generator"
    assert views[0] != plain[0]
    with pytest.raises(ConfigError, match="clip_warmup_crop_min"):
        defenses.build("safeclip", {"clip_warmup_crop_min": 0.0})


def test_unimodal_terms_give_the_other_tower_no_gradient(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), _small(), tmp_path)
    s, model = t.strategy, t.model
    visual = [p for n, p in model.named_parameters() if n.startswith("visual.")]
    textual = [p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
    b = _batch(t, range(32))
    safe = torch.zeros(32, dtype=torch.bool)
    safe[:8] = True  # a mixed batch: 8 safe, 24 risky
    terms = s.loss_terms(b, safe)

    def grads(loss, params):
        return [g for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)]

    def nonzero(gs):
        return any(g is not None and float(g.abs().sum()) > 0 for g in gs)

    def zero(gs):
        return all(g is None or float(g.abs().sum()) == 0 for g in gs)

    assert nonzero(grads(terms["unimodal_image"], visual)) and zero(grads(terms["unimodal_image"], textual))
    assert nonzero(grads(terms["unimodal_text"], textual)) and zero(grads(terms["unimodal_text"], visual))
    assert nonzero(grads(terms["clip"], visual)) and nonzero(grads(terms["clip"], textual))
    # the risky rows drive the unimodal terms only: an all-safe batch has none
    t2 = _built(fm_train.subset(range(256)), _small(), tmp_path / "b")
    all_safe = t2.strategy.loss_terms(_batch(t2, range(32)), torch.ones(32, dtype=torch.bool))
    assert float(all_safe["unimodal_image"].detach()) == 0.0 and float(all_safe["unimodal_text"].detach()) == 0.0


def test_views_are_seeded_and_drawn_fresh(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    safe = torch.zeros(32, dtype=torch.bool)
    a = _built(data, _small(), tmp_path / "a")
    b = _built(data, _small(), tmp_path / "b")
    la = a.strategy.loss_terms(_batch(a, range(32), seed=3), safe)
    lb = b.strategy.loss_terms(_batch(b, range(32), seed=3), safe)
    assert float(la["unimodal_text"].detach()) == float(lb["unimodal_text"].detach())
    assert float(la["unimodal_image"].detach()) == float(lb["unimodal_image"].detach())
    c = _built(data, _small(), tmp_path / "c")
    lc = c.strategy.loss_terms(_batch(c, range(32), seed=4), safe)
    assert float(lc["unimodal_text"].detach()) != float(la["unimodal_text"].detach())


def _views(t, safe, seed=5, pixels=None):
    """The images and captions that ONE mixed step feeds the towers (first views = rows 0..b-1)."""
    seen = {}
    fwd, tok = t.ctx.forward, t.ctx.tokenize
    t.ctx.forward = lambda px, tk: (seen.__setitem__("px", px.detach().clone()), fwd(px, tk))[1]
    t.ctx.tokenize = lambda caps: (seen.__setitem__("caps", list(caps)), tok(caps))[1]
    b = _batch(t, range(len(safe)), seed=seed)
    if pixels is not None:
        b.pixels = pixels
    t.strategy.loss_terms(b, safe)
    n = len(safe)
    return b, seen["px"][:n], seen["caps"][:n]


@pytest.mark.parametrize("policy", ["simclr", "crop-flip", "none"])
def test_safe_pair_augmentation_policy(fm_train, tmp_path, policy):
    data = fm_train.subset(range(256))
    opts = dict(safe_image_augment=policy, safe_text_augment="none" if policy == "none" else "eda",
                crop_scale_min=0.5)
    t = _built(data, _small(**opts), tmp_path)
    safe = torch.zeros(64, dtype=torch.bool)
    safe[:40] = True

    def changed(px, orig):
        return (px - orig).abs().amax(dim=(1, 2, 3)) > 1e-4

    b, px, caps = _views(t, safe)
    moved = changed(px, b.pixels.float())
    assert moved[~safe].all(), "risky rows always get SimCLR views"
    assert moved[safe].all() == (policy != "none") and moved[safe].any() == (policy != "none")
    assert (caps[:40] != b.captions[:40]) == (policy != "none")
    # a flat grey image: crop and flip leave it as it is, colour jitter does not
    t2 = _built(data, _small(**opts), tmp_path / "flat")
    flat = torch.full((64, 3, 28, 28), 0.5)
    _, px2, _ = _views(t2, safe, pixels=flat)
    jittered = changed(px2, flat)
    assert jittered[~safe].float().mean() > 0.5
    assert jittered[safe].any() == (policy == "simclr")


def test_safe_augment_options_are_checked(fm_train, tmp_path):
    from clipguard.errors import ConfigError

    with pytest.raises(ConfigError, match="safe_image_augment"):
        _small(safe_image_augment="blur")
    with pytest.raises(ConfigError, match="safe_text_augment"):
        _small(safe_text_augment="back-translate")
    with pytest.raises(ConfigError, match="augment_safe"):
        _small(augment_safe=False)  # the old switch is gone: safe_image_augment / safe_text_augment


def test_eda_is_deterministic_under_a_seed():
    from clipguard.data.augment import EDA

    eda = EDA()
    caps = ["a photo of a black ankle boot", "a grey pullover on a white background", "shirt"] * 5
    one = eda.augment_batch(caps, random.Random(11))
    two = eda.augment_batch(caps, random.Random(11))
    assert one == two and all(c.strip() for c in one)
    assert eda.augment_batch(caps, random.Random(12)) != one


def test_mixed_epoch_splits_and_safe_and_risky_are_disjoint(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    strat = _small()
    t = Trainer(_cfg(epochs=4), data, tmp_path, strategy=strat)
    t.fit()
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["unimodal", "clip_low", "mixed", "mixed"]
    assert recs[2]["first_split"] and recs[2]["full_evaluation"]
    assert recs[2]["safe_fraction"] == pytest.approx(max(0.3, recs[2]["threshold_fraction"]), abs=0.01)
    assert recs[3]["safe_fraction"] == pytest.approx(min(1.0, recs[2]["m"] + 0.2), abs=0.01)
    assert not recs[3]["full_evaluation"] and recs[3]["evaluated_pairs"] < 256  # the efficient update
    safe = strat.selected()
    assert safe.dtype == torch.bool and safe.shape == (256,)
    assert int(safe.sum()) == recs[3]["safe_size"]


@pytest.mark.parametrize("score", ["global", "local", "caption", "global-given-image"])
def test_the_density_veto_removes_pairs_from_the_ranked_safe_set(fm_train, tmp_path, score):
    """With the default veto (and with the other density scores) the safe set is the top m by score
    minus the vetoed pairs, and the veto state survives in the checkpoint."""
    data = fm_train.subset(range(256))
    given = score.endswith("-given-image")
    strat = _small(density_z=1.0, density_k=8, density_score=score.removesuffix("-given-image"),
                   density_given="image" if given else "none", density_given_k=16)
    Trainer(_cfg(epochs=5), data, tmp_path, strategy=strat).fit()
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    for r in recs[2:]:
        ranked = int(round(r["m"] * 256))
        assert r["density_vetoed"] >= 1 and r["safe_size"] == pytest.approx(ranked - r["density_vetoed"], abs=1)
        assert ("density_spared" in r) == given
    assert strat.state_json()["dense_rounds"] == 3 and "dense" in strat.state_tensors()


def test_the_defaults_shrink_the_clip_epochs_of_a_short_run(fm_train, tmp_path, caplog):
    """Four CLIP epochs before the split do not fit a 2-epoch run: one runs, a mixed epoch
    follows, and the log says so."""
    strat = defenses.build("safeclip", {"pool_size": 64})
    with caplog.at_level("WARNING", logger="clipguard"):
        Trainer(_cfg(epochs=2), fm_train.subset(range(128)), tmp_path, strategy=strat).fit()
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["clip_low", "mixed"]
    assert "leaves no mixed epoch after clip_warmup_epochs = 4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipguard"):  # asking for none is not shrinking
        Trainer(_cfg(epochs=2), fm_train.subset(range(128)), tmp_path / "none",
                strategy=defenses.build("safeclip", {"warmup_epochs": 1, "clip_warmup_epochs": 0})).setup()
    assert "leaves no mixed epoch" not in caplog.text


def test_too_few_epochs_is_a_clear_error(fm_train, tmp_path, caplog):
    from clipguard.errors import ConfigError

    with pytest.raises(ConfigError, match="mixed"):
        Trainer(_cfg(epochs=2), fm_train.subset(range(128)), tmp_path, strategy=_small()).fit()
    with caplog.at_level("WARNING", logger="clipguard"), pytest.raises(ConfigError, match="got --epochs 1"):
        Trainer(_cfg(epochs=1), fm_train.subset(range(128)), tmp_path / "one",
                strategy=defenses.build("safeclip", {"pool_size": 64})).setup()
    assert "leaves no mixed epoch" not in caplog.text  # no promise of a shorter run before the error
    with pytest.raises(ConfigError, match="no option"):
        defenses.build("safeclip", {"warmup": 3})


@pytest.mark.slow
def test_manifest_never_influences_training(fm_dir, tmp_path):
    """Train twice, with and without --attack-manifest: identical weights; diagnostics appear."""
    from clipguard.cli import main

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"attack": "test", "poisoned_rows": list(range(0, 256, 16)),
                                    "target": {"index": 8, "name": "bag"}}))
    common = ["train", "--data", str(fm_dir / "train.csv"), "--limit", "256", "--epochs", "4",
              "--batch-size", "64", "--defense", "safeclip", "--quiet", "--seed", "3",
              "--opt", "warmup_epochs=1", "--opt", "lr_low_factor=0.1", "--opt", "min_initial_fraction=0.25",
              "--opt", "step=0.25", "--opt", "pool_size=128"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "diag"), "--attack-manifest", str(manifest)]) == 0

    def weights(run):
        return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "model.safetensors"))

    a, b = weights(tmp_path / "plain"), weights(tmp_path / "diag")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(x) for x in (tmp_path / "diag" / "results.jsonl").read_text().splitlines()]
    mixed = [r for r in recs if r["phase"] == "mixed"]
    assert all(r["poison_total"] == 16 and r["poison_rate"] == pytest.approx(16 / 256) for r in recs)
    assert all({"safe_poison_count", "safe_poison_rate", "safe_poison_recall", "similarity_auroc"} <= r.keys() for r in mixed)
    assert (tmp_path / "diag" / mixed[0]["similarity_hist"]).stat().st_size > 1000
    plain = [json.loads(x) for x in (tmp_path / "plain" / "results.jsonl").read_text().splitlines()]
    assert all("safe_poison_count" not in r for r in plain)
    assert [r["safe_size"] for r in plain if r["phase"] == "mixed"] == [r["safe_size"] for r in mixed]


def test_pairs_weighting_counts_every_pair_once(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    runs = {}
    for w in ("terms", "pairs"):
        t = _built(data, _small(loss_weighting=w), tmp_path / w)
        t.strategy._safe = torch.zeros(256, dtype=torch.bool)
        t.strategy._safe[:48] = True  # 75% of the batch below is safe
        t.ctx.epoch = 2  # mixed (1 unimodal + 1 CLIP warm-up epoch)
        loss, logs = t.strategy.loss(_batch(t, range(64)))
        runs[w] = (float(loss.detach()), logs)
    (lt, terms), (lp, terms_p) = runs["terms"], runs["pairs"]
    assert terms == terms_p, "the weighting must not change the terms themselves"
    uni = terms["unimodal_image_loss"] + terms["unimodal_text_loss"]
    assert lt == pytest.approx(terms["clip_loss"] + uni, rel=1e-5)
    assert lp == pytest.approx(0.75 * terms["clip_loss"] + 0.25 * uni, rel=1e-5)
    with pytest.raises(Exception, match="loss_weighting"):
        _small(loss_weighting="equal")


@pytest.mark.parametrize("second_view_grad", [False, True])
def test_second_views_are_encoded_without_gradient_by_default(fm_train, tmp_path, second_view_grad):
    t = _built(fm_train.subset(range(256)), _small(second_view_grad=second_view_grad), tmp_path)
    rows = {}
    fwd, enc = t.ctx.forward, t.ctx.encode_views
    t.ctx.forward = lambda px, tk: (rows.__setitem__("grad", len(px)), fwd(px, tk))[1]
    t.ctx.encode_views = lambda px, tk: (rows.__setitem__("nograd", len(px)), enc(px, tk))[1]
    safe = torch.zeros(32, dtype=torch.bool)
    safe[:8] = True  # 24 risky pairs need a second view
    terms = t.strategy.loss_terms(_batch(t, range(32)), safe)
    if second_view_grad:
        assert rows == {"grad": 32 + 24}  # both views in the one forward with gradient (NNCLR)
    else:
        assert rows == {"grad": 32, "nograd": 24}  # only the first views get a backward pass
    visual = [p for n, p in t.model.named_parameters() if n.startswith("visual.")]
    g = torch.autograd.grad(terms["unimodal_image"], visual, allow_unused=True)
    assert any(x is not None and float(x.abs().sum()) > 0 for x in g)


def test_risky_images_enter_the_clip_loss_with_their_safe_neighbours_captions(fm_train, tmp_path):
    """risky_clip: neighbours. A risky pair's own caption gets no gradient from the CLIP term, its
    image is contrasted with the mean caption embedding of its k nearest pooled safe images, and
    only safe pairs enter the pool."""
    import torch.nn.functional as F

    t = _built(fm_train.subset(range(256)), _small(risky_clip="neighbours", risky_clip_k=2), tmp_path)
    s = t.strategy
    t.ctx.epoch = 2  # mixed
    s._safe = torch.zeros(256, dtype=torch.bool)
    s._safe[:16] = True
    pool = s._safe_pool
    b = _batch(t, range(32))
    assert not s._borrows(True)  # empty pool: the CLIP term holds the safe pairs only
    s.loss_terms(b, s._safe[:32], borrow=True)
    assert len(pool) == 16 and s._borrows(True) and not s._borrows(False)
    with torch.no_grad():
        img, txt = t.ctx.encode_views(b.pixels[:16], b.tokens[:16])
    assert torch.allclose(pool.entries(), img, atol=1e-5) and torch.allclose(pool.payload[:16], txt, atol=1e-5)

    # the pool now decides every risky image's caption: pairs with a known nearest pair
    safe = torch.zeros(32, dtype=torch.bool)
    safe[:16] = True
    captured = {}
    import clipguard.defenses.safeclip as sc
    real = sc.clip_loss

    def spy(i, tx, scale, dist=None, mask=None):
        captured.update(txt=tx, mask=mask)
        return real(i, tx, scale, dist, mask)

    sc.clip_loss = spy
    try:
        terms = s.loss_terms(b, safe, borrow=True)
    finally:
        sc.clip_loss = real
    assert captured["mask"] is None
    probe, _ = t.ctx.encode_views(b.pixels[16:])
    near = (probe @ pool.entries()[:16].t()).topk(2, dim=1).indices
    want = F.normalize(pool.payload[near].mean(1), dim=-1)
    assert torch.allclose(captured["txt"][16:], want, atol=1e-5)
    assert len(pool) == 32  # the second batch's safe rows were pushed
    textual = [p for n, p in t.model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
    t.model.zero_grad()
    captured["txt"][16:].sum().backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in textual), \
        "a risky pair's borrowed caption must not train the text tower"
    assert torch.isfinite(terms["clip"])
    with pytest.raises(Exception, match="risky_clip"):
        _small(risky_clip="own")
    with pytest.raises(Exception, match="risky_clip_k"):
        _small(risky_clip_k=0)


def test_risky_clip_trains_and_resumes(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    strat = _small(risky_clip="neighbours")
    Trainer(_cfg(epochs=4), data, tmp_path, strategy=strat).fit()
    state = strat.state_tensors()
    assert "safe_pool.bank" in state and int(state["safe_pool.filled"]) > 0
    other = _small(risky_clip="neighbours")
    _built(data, other, tmp_path / "b")
    other.load_state(state, strat.state_json())
    assert torch.equal(other._safe_pool.bank, strat._safe_pool.bank)


def test_a_first_split_after_a_clip_epoch_at_chance_is_reported_and_warned(fm_train, tmp_path, caplog):
    """The first split is only as good as the model after the slow CLIP epoch: its loss against
    chance is recorded, and a split made at chance is warned about, once per run."""
    import logging
    import math

    t = _built(fm_train.subset(range(256)), _small(), tmp_path)
    s = t.strategy
    chance = math.log(t.ctx.batch_size)
    assert s.phase(1) == "clip_low" and s.phase(2) == "mixed"
    t.ctx.epoch = 1
    s.on_epoch_start(1)
    s.loss(_batch(t, range(32)))  # a slow CLIP step feeds the monitor
    assert s._aligned.steps == 1
    s._aligned.reset()
    s._aligned.add(chance)
    with caplog.at_level(logging.WARNING, logger="clipguard"):
        t.ctx.epoch = 2
        rec = s.on_epoch_start(2)
        assert rec["clip_loss_vs_chance"] == pytest.approx(1.0)
        assert "clip_loss_vs_chance" not in s.on_epoch_start(3)  # later splits: no slow CLIP epoch before them
    assert sum("first split" in r.getMessage() for r in caplog.records) == 1


def test_safe_views_last_only_the_first_safe_augment_epochs(fm_train, tmp_path):
    """With safe_augment_epochs 1 the first mixed epoch trains the safe pairs on the views and the
    next ones on the pairs as they are: the same safe batch then gives the plain CLIP loss."""
    t = _built(fm_train.subset(range(256)), _small(safe_image_augment="simclr", safe_text_augment="eda",
                                                  safe_augment_epochs=1), tmp_path, epochs=5)
    s = t.strategy
    everyone = torch.ones(32, dtype=torch.bool)
    t.ctx.epoch = 2  # the first mixed epoch
    assert s._safe_views() == ("simclr", "eda")
    t.ctx.epoch = 3
    assert s._safe_views() == ("none", "none")
    batch = _batch(t, range(32))
    with torch.no_grad():
        terms = s.loss_terms(batch, everyone)
        img, txt, scale = t.ctx.forward(batch.pixels, batch.tokens)
        plain = clip_loss(img, txt, scale, t.ctx.dist)
    assert torch.allclose(terms["clip"], plain, atol=1e-5)


def test_clip_loss_with_extra_negatives_adds_them_to_the_caption_side_only():
    """``negatives``: the masked-out rows' images join each kept caption's softmax, never the
    image side, and they get a gradient (pushed from the kept captions)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_(True)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    scale = torch.tensor(10.0)
    keep = torch.tensor([True, True, False, True, False, False])
    risky = ~keep
    got = clip_loss(img, txt, scale, mask=keep, negatives=risky)
    i, t, extra = img[keep], txt[keep], img[risky]
    labels = torch.arange(3)
    want = 0.5 * (F.cross_entropy(scale * i @ t.t(), labels)
                  + F.cross_entropy(scale * t @ torch.cat([i, extra]).t(), labels))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(clip_loss(img, txt, scale, mask=keep)) != pytest.approx(float(got))
    got.backward()
    assert float(img.grad[risky].abs().sum()) > 0  # the risky images are pushed
    # no risky row in the batch, or no mask: the plain loss
    none = torch.zeros(6, dtype=torch.bool)
    assert float(clip_loss(img, txt, scale, mask=keep | risky, negatives=none)) == pytest.approx(
        float(clip_loss(img, txt, scale)), rel=1e-6)


def test_risky_negatives_reach_the_clip_term_of_a_mixed_step(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), _small(risky_negatives=True), tmp_path)
    s = t.strategy
    t.ctx.epoch = 2  # mixed
    safe = torch.zeros(32, dtype=torch.bool)
    safe[:20] = True
    captured = {}
    import clipguard.defenses.safeclip as sc
    real = sc.clip_loss

    def spy(i, tx, scale, dist=None, mask=None, negatives=None):
        captured.update(mask=mask, negatives=negatives)
        return real(i, tx, scale, dist, mask, negatives)

    sc.clip_loss = spy
    try:
        terms = s.loss_terms(_batch(t, range(32)), safe)
    finally:
        sc.clip_loss = real
    assert torch.equal(captured["mask"], safe) and torch.equal(captured["negatives"], ~safe)
    assert torch.isfinite(terms["clip"])
    with pytest.raises(Exception, match="risky_negatives"):
        _small(risky_negatives=True, risky_clip="neighbours")


def test_without_a_risky_loss_a_mixed_step_is_one_clip_forward_over_the_safe_rows(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    t = _built(data, _small(warmup_epochs=0, risky_loss="none"), tmp_path / "none")
    rows = []
    fwd = t.ctx.forward
    t.ctx.forward = lambda px, tk: (rows.append(len(px)), fwd(px, tk))[1]
    safe = torch.zeros(32, dtype=torch.bool)
    safe[:20] = True
    b = _batch(t, range(32))
    terms = t.strategy.loss_terms(b, safe)
    assert rows == [32]  # no second views
    assert float(terms["unimodal_image"]) == 0.0 and float(terms["unimodal_text"]) == 0.0
    assert len(t.strategy._img_pool) == 0  # nothing pushed for a loss that is not there
    # the CLIP term is the one over the safe rows of the pairs as they are
    img, txt, scale = fwd(b.pixels, b.tokens)
    assert float(terms["clip"].detach()) == pytest.approx(float(clip_loss(img, txt, scale, mask=safe).detach()), rel=1e-5)
    # the whole step: the CLIP term weighted by the safe share, and it trains
    t.ctx.epoch = 1  # mixed (no unimodal epoch, one CLIP epoch before the split)
    t.strategy._safe = torch.zeros(256, dtype=torch.bool)
    t.strategy._safe[:20] = True
    loss, logs = t.strategy.loss(_batch(t, range(32)))
    assert loss.requires_grad and logs["unimodal_image_loss"] == 0.0
    assert float(loss.detach()) == pytest.approx(20 / 32 * logs["clip_loss"], rel=1e-5)


def test_risky_loss_is_checked():
    with pytest.raises(ConfigError, match="risky_loss"):
        _small(warmup_epochs=0, risky_loss="nothing")
    with pytest.raises(ConfigError, match="warmup_epochs 0"):
        _small(warmup_epochs=1, risky_loss="none")
    with pytest.raises(ConfigError, match="risky_clip"):
        _small(warmup_epochs=0, risky_loss="none", risky_clip="neighbours")


def _resumes_exactly(data, tmp_path, make, epochs: int) -> list[dict]:
    """Train ``epochs`` straight through (run a) and again stopped after two epochs and resumed
    (run b), each with a fresh strategy from ``make()``; assert the final weights are identical and
    return run a's epoch records."""
    Trainer(_cfg(epochs=epochs), data, tmp_path / "a", strategy=make()).fit()
    Trainer(_cfg(epochs=epochs, stop_after=2), data, tmp_path / "b", strategy=make()).fit()
    Trainer(_cfg(epochs=epochs), data, tmp_path / "b", strategy=make()).fit(resume="latest")
    last = f"epoch_{epochs:03d}"
    wa, wb = (load_file(str(tmp_path / r / "checkpoints" / last / "model.safetensors")) for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]


def test_without_a_risky_loss_a_run_resumes_exactly(fm_train, tmp_path):
    recs = _resumes_exactly(fm_train.subset(range(256)), tmp_path,
                            lambda: _small(warmup_epochs=0, risky_loss="none"), epochs=3)
    mixed = [r for r in recs if r.get("phase") == "mixed"]
    assert mixed and all(r["unimodal_image_loss"] == 0.0 for r in mixed)

def _cheap(**kw):
    """The cheaper mixed epochs' tests: no unimodal epoch, one CLIP epoch at the base lr, the
    density veto on (a split update with candidates to re-score)."""
    return _small(**{"warmup_epochs": 0, "lr_low_factor": 1.0, "density_z": 1.0, "repeat_z": None, **kw})


def test_one_view_risky_loss_encodes_each_pair_once(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), _cheap(risky_loss="one-view"), tmp_path, epochs=4)
    s = t.strategy
    s._img_pool.push(torch.nn.functional.normalize(torch.randn(64, s._img_pool.dim), dim=1))
    s._txt_pool.push(torch.nn.functional.normalize(torch.randn(64, s._txt_pool.dim), dim=1))
    rows, seen = [], {}
    fwd = t.ctx.forward

    def spy(px, tk):
        rows.append(len(px))
        out = fwd(px, tk)
        seen["img"], seen["txt"] = out[0], out[1]
        return out

    t.ctx.forward = spy
    safe = torch.zeros(32, dtype=torch.bool)
    safe[:20] = True
    img_bank, txt_bank = s._img_pool.bank.clone(), s._txt_pool.bank.clone()
    terms = s.loss_terms(_batch(t, range(32)), safe)
    assert rows == [32]  # no second views
    # the unimodal terms: each risky view against its own pool neighbour (the pool as it was
    # before this step pushed the batch)
    s._img_pool.bank.copy_(img_bank)
    s._txt_pool.bank.copy_(txt_bank)
    s._img_pool.filled.fill_(64)
    s._txt_pool.filled.fill_(64)
    s._img_pool.ptr.fill_(64)
    s._txt_pool.ptr.fill_(64)
    want_img = nn_self_loss(seen["img"], s._img_pool, ~safe, s.opt.temperature)
    want_txt = nn_self_loss(seen["txt"], s._txt_pool, ~safe, s.opt.temperature)
    got_img, got_txt = float(terms["unimodal_image"].detach()), float(terms["unimodal_text"].detach())
    assert got_img == pytest.approx(float(want_img.detach()), rel=1e-5) and got_img > 0
    assert got_txt == pytest.approx(float(want_txt.detach()), rel=1e-5)
    assert terms["unimodal_image"].requires_grad


def test_a_mixed_step_keeps_the_safe_pairs_features_for_the_next_update(fm_train, tmp_path):
    t = _built(fm_train.subset(range(256)), _cheap(update_features="steps"), tmp_path, epochs=4)
    s = t.strategy
    t.ctx.epoch = 1  # mixed
    s._safe = torch.zeros(256, dtype=torch.bool)
    s._safe[40:60] = True
    idx = torch.arange(32, 96)
    s.loss(_batch(t, idx))
    kept = torch.nonzero(s._step_fresh).flatten()
    assert kept.tolist() == list(range(40, 60))  # the safe rows of the batch, no other
    img, txt = t.ctx.encode_dataset(indices=kept)
    want = torch.cat([img, txt], dim=1)
    assert torch.allclose(s._step_feats[kept].float(), want, atol=2e-3)  # fp16 storage
    assert float(s._step_feats[~s._step_fresh].abs().sum()) == 0.0


def test_an_update_encodes_only_the_candidates_the_steps_did_not_see(fm_train, tmp_path):
    data = fm_train.subset(range(256))
    t = _built(data, _cheap(update_features="steps", update_fraction=0.5, update_margin=0.0), tmp_path, epochs=4)
    s = t.strategy
    s.on_epoch_start(1)  # the first split encodes every pair and fills the feature cache
    assert bool(s._step_feats.abs().sum(dim=1).gt(0).all())
    s._step_fresh[:100] = True
    s._strikes = torch.zeros(256, dtype=torch.uint8)
    s._strikes[100:120] = s.opt.density_strikes  # out for good: their last features stand
    encoded = []
    enc = t.ctx.encode_dataset
    t.ctx.encode_dataset = lambda **kw: (encoded.append(kw["indices"].clone()), enc(**kw))[1]
    cand, _ = s._candidates(256)
    rec = s.on_epoch_start(2)
    done = torch.cat(encoded)
    want = cand[cand >= 120]
    assert sorted(done.tolist()) == sorted(want.tolist())
    assert rec["reused_features"] == len(cand) - len(want) and rec["evaluated_pairs"] == len(cand)
    assert not bool(s._step_fresh.any())  # the next epoch's steps start afresh


@pytest.mark.parametrize("ranks", ["together", "rescored-first"])
def test_a_rescored_first_update_keeps_its_safe_set_within_the_pairs_it_scored_again(fm_train, tmp_path, ranks):
    t = _built(fm_train.subset(range(256)), _cheap(update_ranks=ranks, update_fraction=0.5, update_margin=0.0),
               tmp_path, epochs=4)
    s = t.strategy
    s.on_epoch_start(1)
    s._sims += 10.0  # stale scores above any fresh one; the same candidates (the order is unchanged)
    cand, full = s._candidates(256)
    rec = s.on_epoch_start(2)
    assert not full and rec["evaluated_pairs"] == len(cand) < 256
    stale = set(torch.nonzero(s._safe).flatten().tolist()) - set(cand.tolist())
    assert (not stale) if ranks == "rescored-first" else len(stale) > 10


def test_update_features_is_checked():
    with pytest.raises(ConfigError, match="update_features"):
        _cheap(update_features="steps", safe_image_augment="simclr")
    with pytest.raises(ConfigError, match="update_features"):
        _cheap(update_features="cached")
    with pytest.raises(ConfigError, match="risky_loss"):
        _cheap(risky_loss="two-views")


@pytest.mark.parametrize("opts", [{"update_features": "steps"}, {"risky_loss": "one-view"}])
def test_the_cheaper_steps_resume_exactly(fm_train, tmp_path, opts):
    recs = _resumes_exactly(fm_train.subset(range(256)), tmp_path, lambda: _cheap(**opts), epochs=4)
    updates = [r for r in recs if r.get("phase") == "mixed" and not r.get("first_split")]
    assert updates
    if "update_features" in opts:
        assert all(r["reused_features"] > 0 for r in updates)


def test_lowest_loss_rows_leaves_out_the_pairs_whose_captions_do_not_fit():
    from clipguard.training.losses import lowest_loss_rows

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    txt = img.clone()
    txt[[2, 5]] = txt[[5, 2]]  # two pairs swap captions
    rows, whole = lowest_loss_rows(img, txt, torch.tensor(20.0), 0.75)
    assert rows.tolist() == [True, True, False, True, True, False, True, True]
    logits = 20.0 * img @ txt.t()
    labels = torch.arange(8)
    full = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                  + torch.nn.functional.cross_entropy(logits.t(), labels))
    assert float(whole) == pytest.approx(float(full), rel=1e-5)
    assert lowest_loss_rows(img, txt, torch.tensor(20.0), 1.0)[0].all()
    few = lowest_loss_rows(img, txt, torch.tensor(20.0), 0.01)[0]
    assert int(few.sum()) >= 1 and not few[[2, 5]].any()  # at least one row (ties at the cut all kept)


def test_clip_warmup_keep_trains_the_lowest_loss_pairs_before_the_split(fm_train, tmp_path):
    """A CLIP step before the first split with clip_warmup_keep is the CLIP loss of the pairs
    with the lowest own loss only; the chance monitor and the log read the whole batch's loss."""
    from clipguard.training.losses import lowest_loss_rows

    opts = dict(warmup_epochs=0, clip_warmup_epochs=1, clip_warmup_crop_min=None)
    t = _built(fm_train.subset(range(128)), _small(**opts, clip_warmup_keep=0.5), tmp_path, epochs=3)
    t.strategy.on_epoch_start(0)
    assert t.strategy.phase(0) == "clip_low"
    batch = _batch(t, torch.arange(64))
    loss, logs = t.strategy.loss(batch)
    with torch.no_grad():
        img, txt, scale = t.ctx.forward(batch.pixels, batch.tokens)
        rows, whole = lowest_loss_rows(img, txt, scale, 0.5)
        assert int(rows.sum()) == 32
        assert float(loss) == pytest.approx(float(clip_loss(img, txt, scale, mask=rows)), rel=1e-5)
        assert logs["clip_loss"] == pytest.approx(float(whole), rel=1e-5)
        assert logs["kept_clip_loss"] < logs["clip_loss"]
    with pytest.raises(ConfigError, match="clip_warmup_keep must be in"):
        _small(clip_warmup_keep=0.0)
    with pytest.raises(ConfigError, match="clip_warmup_keep must be in"):
        _small(clip_warmup_keep=1.5)
