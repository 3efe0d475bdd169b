"""SafeCLIP's pattern veto: the pairs whose image carries their caption group's riskiest pairs'
shared pattern stay out of the safe set; clean groups lose few pairs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from clipguard import defenses
from clipguard.defenses.pattern_veto import PatternVeto, caption_embeddings
from clipguard.errors import ConfigError
from clipguard.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _patterned(n_per: int = 200, poisons: int = 30, seed: int = 0):
    """Smooth random 28 px images under two captions; ``poisons`` "dog" images carry one fixed
    additive noise pattern (+-24 grey levels, as a Blended trigger at a low alpha)."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * n_per
    smooth = torch.nn.functional.interpolate(torch.rand(n, 1, 7, 7, generator=g), size=28,
                                             mode="bilinear", align_corners=False) * 200 + 20
    pattern = (torch.rand(1, 1, 28, 28, generator=g) * 48 - 24)
    poisoned = torch.arange(n_per, n_per + poisons)
    smooth[poisoned] += pattern
    imgs = smooth.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).clone()
    captions = ["a photo of a cat"] * n_per + ["a photo of a dog"] * n_per
    return SimpleNamespace(images=imgs, captions=captions), poisoned


def _ctx(data):
    """What the veto reads of a run: the images, the captions' tokens, an untrained cg-tiny."""
    from clipguard.models.factory import create_model, get_tokenizer
    from clipguard.training.distributed import DistInfo

    model = create_model("cg-tiny", seed=0)
    return SimpleNamespace(data=data, tokens=get_tokenizer("cg-tiny")(data.captions), raw_model=model,
                           device=torch.device("cpu"), dist=DistInfo())


def test_the_veto_flags_the_pattern_its_groups_riskiest_pairs_share():
    """The riskiest 20 "dog" pairs are poisons; the veto flags nearly every poison, the 10 the
    ranking missed included, and almost no clean pair of either group."""
    data, poisoned = _patterned()
    ctx = _ctx(data)
    suspicion = torch.rand(len(data.captions), generator=torch.Generator().manual_seed(1))
    suspicion[poisoned[:20]] += 10.0  # the split ranks two thirds of the poisons riskiest
    flagged = PatternVeto(z=3.0, share=0.1, clusters=50).vetoed(ctx, suspicion)
    is_poison = torch.zeros(len(flagged), dtype=torch.bool)
    is_poison[poisoned] = True
    assert int(flagged[is_poison].sum()) >= 28
    assert int(flagged[poisoned[20:]].sum()) >= 8  # found by their pixels, not by the ranking
    assert int(flagged[~is_poison].sum()) <= 4


def test_groups_sized_by_the_data_see_a_pattern_that_groups_of_a_few_pairs_miss():
    """Twenty captions per class split the 400 pairs into groups of about ten under 50 clusters,
    each too small to judge (min_group 20): nothing is flagged. Asking every group to hold 200
    pairs on average leaves two groups, each large enough to estimate the poisons' pattern."""
    data, poisoned = _patterned()
    data.captions = [f"a photo of a {'cat' if i < 200 else 'dog'} number {i % 20}" for i in range(400)]
    ctx = _ctx(data)
    suspicion = torch.rand(400, generator=torch.Generator().manual_seed(1))
    suspicion[poisoned[:20]] += 10.0
    assert PatternVeto(z=3.0, share=0.1, clusters=50).groups_for(400) == 50
    assert int(PatternVeto(z=3.0, share=0.1, clusters=50).vetoed(ctx, suspicion).sum()) == 0
    sized = PatternVeto(z=3.0, share=0.1, clusters=50, group_pairs=200)
    assert sized.groups_for(400) == 2
    flagged = sized.vetoed(ctx, suspicion)
    assert int(flagged[poisoned].sum()) >= 25 and int(flagged.sum()) - int(flagged[poisoned].sum()) <= 4


def test_the_number_of_caption_groups_follows_the_data_up_to_pattern_clusters():
    veto = PatternVeto(z=3.0, share=0.1, clusters=50, group_pairs=300)
    assert [veto.groups_for(n) for n in (10, 299, 600, 4460, 9460, 15000, 60000)] == [1, 1, 2, 14, 31, 50, 50]


def test_with_no_shared_pattern_the_veto_flags_few_pairs():
    data, _ = _patterned(poisons=0)
    ctx = _ctx(data)
    suspicion = torch.rand(len(data.captions), generator=torch.Generator().manual_seed(2))
    assert int(PatternVeto(z=3.0, share=0.1, clusters=50).vetoed(ctx, suspicion).sum()) <= 4


def test_pattern_options_are_checked():
    with pytest.raises(ConfigError, match="pattern_z"):
        defenses.build("safeclip", {"pattern_z": 0})
    with pytest.raises(ConfigError, match="pattern_share"):
        defenses.build("safeclip", {"pattern_z": 3, "pattern_share": 1.0})
    with pytest.raises(ConfigError, match="pattern_clusters"):
        defenses.build("safeclip", {"pattern_z": 3, "pattern_clusters": 0})
    with pytest.raises(ConfigError, match="pattern_group_pairs"):
        defenses.build("safeclip", {"pattern_z": 3, "pattern_group_pairs": 0})
    assert defenses.build("safeclip", {}).opt.pattern_z == 3.0  # on by default since the forty-fourth round
    base = defenses.build("safeclip", {"pattern_z": None}).opt.identity()
    assert "pattern_z" not in base and "pattern_share" not in base  # off: not part of a run's identity
    # what shapes the veto, and the unlearning of its flags, is no part of a run's identity while it is off
    assert "pattern_unlearn" not in base and "pattern_unlearn_z" not in base
    idle = defenses.build("safeclip", {"pattern_z": None, "pattern_share": 0.2, "pattern_clusters": 8,
                                       "pattern_group_pairs": 300, "pattern_unlearn": 0.3,
                                       "pattern_unlearn_z": 5}).opt.identity()
    assert idle == base
    on = defenses.build("safeclip", {"pattern_z": 3, "pattern_share": 0.2}).opt.identity()
    assert on["pattern_z"] == 3 and on["pattern_share"] == 0.2
    assert on["pattern_group_pairs"] == 400  # the default since the fifty-first round
    pinned = defenses.build("safeclip", {"pattern_group_pairs": None}).opt.identity()
    assert "pattern_group_pairs" not in pinned  # None, as every run before it existed
    assert defenses.build("safeclip", {"pattern_group_pairs": 300}).opt.identity()["pattern_group_pairs"] == 300


def _pattern_strategy(**extra):
    """SafeCLIP on 256 pairs with the pattern veto at a low cut, so that a tiny run flags pairs."""
    return defenses.build("safeclip", dict(warmup_epochs=0, clip_warmup_epochs=1, lr_low_factor=1.0,
                                           min_initial_fraction=0.3, step=0.2, pool_size=128, density_z=None,
                                           repeat_z=None, pattern_z=2.0, pattern_clusters=4, **extra))


def _cfg(**kw) -> TrainConfig:
    """The 4-epoch cg-tiny run the tests below train."""
    return TrainConfig(model="cg-tiny", epochs=4, batch_size=64, lr=1e-3, warmup=2, seed=0, device="cpu",
                       quiet=True, **kw)


def _assert_same_final_weights(tmp_path, a: str, b: str) -> None:
    wa, wb = (load_file(str(tmp_path / r / "checkpoints" / "epoch_004" / "model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _run_and_resume(data, tmp_path, **extra) -> list[dict]:
    """A 4-epoch run, and the same run stopped after 2 epochs and resumed: the same weights.
    Returns the first run's epoch records."""
    Trainer(_cfg(), data, tmp_path / "a", strategy=_pattern_strategy(**extra)).fit()
    Trainer(_cfg(stop_after=2), data, tmp_path / "b", strategy=_pattern_strategy(**extra)).fit()
    Trainer(_cfg(), data, tmp_path / "b", strategy=_pattern_strategy(**extra)).fit(resume="latest")
    _assert_same_final_weights(tmp_path, "a", "b")
    return [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]


def test_a_run_with_the_pattern_veto_removes_flagged_pairs_and_resumes_exactly(fm_train, tmp_path):
    """Every mixed epoch logs how many pairs the veto flagged; the safe set is the ranked top m
    minus the vetoed pairs; a run stopped after its first split resumes to the same weights."""
    recs = _run_and_resume(fm_train.subset(range(256)), tmp_path)
    mixed = [r for r in recs if r.get("phase") == "mixed"]
    assert len(mixed) == 3 and all("pattern_flagged" in r for r in mixed)
    assert any(r["density_vetoed"] >= 1 for r in mixed)
    for r in mixed:
        assert r["safe_size"] == pytest.approx(round(r["m"] * 256) - r["density_vetoed"], abs=1)


def test_unlearning_pushes_a_flagged_image_below_its_batchs_mean_caption_and_fades():
    """The term lowers a flagged image's score for its own caption, leaves unflagged rows and the
    logit scale alone, and vanishes once the own caption scores well below the batch's mean."""
    from clipguard.training.losses import own_caption_unlearning

    g = torch.Generator().manual_seed(0)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    img = txt.clone().requires_grad_(True)  # every image sits on its own caption
    scale = torch.tensor(20.0, requires_grad=True)
    rows = torch.tensor([True, False, False, True, False, False])
    loss = own_caption_unlearning(img, txt, scale, rows)
    loss.backward()
    assert float(loss.detach()) > 1.0
    assert scale.grad is None  # the temperature is not the term's to move
    assert torch.count_nonzero(img.grad[~rows]) == 0 and torch.count_nonzero(img.grad[rows]) > 0
    moved = torch.nn.functional.normalize(img.detach() - 0.5 * img.grad, dim=-1)
    assert all(float(moved[i] @ txt[i]) < float(img.detach()[i] @ txt[i]) for i in (0, 3))
    far = torch.nn.functional.normalize(-txt, dim=-1)  # the own caption is the least likely one
    assert float(own_caption_unlearning(far, txt, scale, rows)) < 1e-3
    none = own_caption_unlearning(img, txt, scale, torch.zeros(6, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_unlearning_options_are_checked():
    with pytest.raises(ConfigError, match="pattern_unlearn must be > 0"):
        defenses.build("safeclip", {"pattern_z": 3, "pattern_unlearn": 0})
    with pytest.raises(ConfigError, match="pattern_unlearn_z must be > 0"):
        defenses.build("safeclip", {"pattern_z": 3, "pattern_unlearn": 0.3, "pattern_unlearn_z": -1})
    d = defenses.build("safeclip", {}).opt  # the defaults since the forty-fourth round
    assert (d.pattern_unlearn, d.pattern_unlearn_z) == (0.05, 4.0)
    # without the veto the term has nothing to unlearn: the defaults with pattern_z=None build, and
    # the term and its cut stay out of the identity; without the term its cut stays out too
    assert "pattern_unlearn" not in defenses.build("safeclip", {"pattern_z": None}).opt.identity()
    no_term = defenses.build("safeclip", {"pattern_unlearn": None}).opt.identity()
    assert "pattern_unlearn" not in no_term and "pattern_unlearn_z" not in no_term and no_term["pattern_z"] == 3.0


def test_a_stricter_unlearning_cut_flags_a_subset_of_the_veto():
    """One scoring, two cuts: the pairs above the higher cut are among those above the lower."""
    data, poisoned = _patterned()
    ctx = _ctx(data)
    suspicion = torch.rand(len(data.captions), generator=torch.Generator().manual_seed(1))
    suspicion[poisoned[:20]] += 10.0
    veto = PatternVeto(z=3.0, share=0.1, clusters=50)
    low, high, none = veto.flags(ctx, suspicion, (3.0, 6.0, 1e6))
    assert torch.equal(low, veto.vetoed(ctx, suspicion))
    assert bool((high <= low).all()) and int(high.sum()) >= 20 and int(none.sum()) == 0


@pytest.mark.parametrize("unlearn_z", [None, 2.5])
def test_a_run_that_unlearns_flagged_pairs_logs_the_term_and_resumes_exactly(fm_train, tmp_path, unlearn_z):
    recs = _run_and_resume(fm_train.subset(range(256)), tmp_path, pattern_unlearn=1.0, pattern_unlearn_z=unlearn_z)
    mixed = [r for r in recs if r.get("phase") == "mixed"]
    assert mixed and all("pattern_unlearn_loss" in r for r in mixed)
    assert any(r["pattern_unlearn_loss"] > 0 for r in mixed)
    assert all("pattern_unlearn_loss" not in r for r in recs if r.get("phase") != "mixed")
    if unlearn_z is not None:  # the stricter cut unlearns a subset of the vetoed pairs
        assert all(r["pattern_unlearnt"] <= r["pattern_flagged"] for r in mixed)


def test_the_veto_without_its_unlearning_term_trains_with_no_such_term(fm_train, tmp_path):
    """pattern_unlearn None with pattern_unlearn_z left at its default: the veto flags, nothing is
    unlearnt (this once crashed the first mixed step)."""
    data = fm_train.subset(range(256))
    Trainer(_cfg(), data, tmp_path / "a", strategy=_pattern_strategy(pattern_unlearn=None)).fit()
    recs = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    mixed = [r for r in recs if r.get("phase") == "mixed"]
    assert mixed and all("pattern_flagged" in r for r in mixed)
    assert all("pattern_unlearn_loss" not in r and "pattern_unlearnt" not in r for r in recs)


def test_the_diagnostics_count_the_poisons_among_the_flagged_pairs():
    """With an image-side veto's flags the per-epoch record says how many of them are poisons,
    overall and per attack part; without flags it says nothing of them."""
    from clipguard.evaluation.detection import poison_stats

    poisoned = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    parts = {"part0-badnet": torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool),
             "part1-sig": torch.tensor([0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)}
    flagged = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    rec = poison_stats(None, None, poisoned, parts, flagged)
    assert rec["flagged_count"] == 3 and rec["flagged_poison_count"] == 2
    assert rec["flagged_poison_in"] == {"part0-badnet": "1/2", "part1-sig": "1/1"}
    assert "flagged_count" not in poison_stats(None, None, poisoned, parts)


@pytest.mark.parametrize("text", [True, False])
def test_unlearning_moves_the_captions_only_when_asked(text):
    strategy = defenses.build("safeclip", {"pattern_z": 3, "pattern_unlearn": 0.3, "pattern_unlearn_text": text})
    strategy._unlearnt = torch.tensor([True, False, False, False])
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_(True)
    txt = img.detach().clone().requires_grad_(True)
    terms = strategy._with_unlearning({}, SimpleNamespace(indices=torch.arange(4)), img, txt, torch.tensor(20.0))
    terms["pattern_unlearn"].backward()
    assert img.grad is not None and torch.count_nonzero(img.grad[0]) > 0
    assert (txt.grad is not None) == text


def test_the_veto_groups_by_the_splits_own_caption_features_bit_for_bit(fm_train, tmp_path, monkeypatch):
    """A split hands the caption features it encoded to the veto instead of the veto encoding
    them again (a partial update: those of the pairs it scored, the veto encodes the rest): the
    same flags and the same weights as when the veto encodes them itself, every split hands them
    over, and the later, partial updates hand over part of them."""
    import clipguard.defenses.safeclip as safeclip_module

    data = fm_train.subset(range(256))
    handed: list[bool] = []
    partial: list[bool] = []
    flags = PatternVeto.flags

    def spy(self, ctx, suspicion, cuts, text=None):
        handed.append(text is not None)
        if text is not None:  # exactly what the veto would have encoded
            partial.append(bool(text.isnan().any()))
            assert torch.allclose(caption_embeddings(ctx, text), caption_embeddings(ctx, None), atol=1e-6, rtol=0)
        return flags(self, ctx, suspicion, cuts, text)

    monkeypatch.setattr(PatternVeto, "flags", spy)
    Trainer(_cfg(), data, tmp_path / "reused", strategy=_pattern_strategy()).fit()
    assert handed and all(handed) and not partial[0] and any(partial)
    scores = safeclip_module.shard_pair_scores
    monkeypatch.setattr(safeclip_module, "shard_pair_scores",
                        lambda *a, **k: scores(*a, **k)._replace(text=None))  # the veto encodes them itself
    handed.clear()
    Trainer(_cfg(), data, tmp_path / "encoded", strategy=_pattern_strategy()).fit()
    assert handed and not any(handed)
    recs = {r: [json.loads(x) for x in (tmp_path / r / "results.jsonl").read_text().splitlines()]
            for r in ("reused", "encoded")}
    keys = ("pattern_flagged", "pattern_unlearnt", "safe_size")
    assert [[x.get(k) for k in keys] for x in recs["reused"]] == [[x.get(k) for k in keys] for x in recs["encoded"]]
    _assert_same_final_weights(tmp_path, "reused", "encoded")


def test_a_partial_update_can_hold_the_last_full_splits_pattern_flags(fm_train, tmp_path, monkeypatch):
    """pattern_partial: full keeps the pairs the last full split's veto flagged out of the safe set
    at the partial updates after it (recorded as pattern_held, not counted as strikes); fresh, the
    default, holds nothing. A resumed run restores the held flags."""
    from clipguard.defenses.safeclip import SafeClip

    with pytest.raises(ConfigError, match="pattern_partial"):
        defenses.build("safeclip", {"pattern_z": 3, "pattern_partial": "always"})
    data = fm_train.subset(range(256))
    seen: list[tuple[bool, int]] = []
    start = SafeClip.on_epoch_start

    def spy(self, epoch):
        rec = start(self, epoch)
        if rec.get("full_evaluation") is False and self._full_patterned is not None:
            held = self._full_patterned
            seen.append((self.opt.pattern_partial == "full", int((self._safe & held).sum())))
        return rec

    monkeypatch.setattr(SafeClip, "on_epoch_start", spy)
    strategy = _pattern_strategy(pattern_partial="full")
    Trainer(_cfg(), data, tmp_path / "full", strategy=strategy).fit()
    recs = [json.loads(x) for x in (tmp_path / "full" / "results.jsonl").read_text().splitlines()]
    partial = [r for r in recs if r.get("full_evaluation") is False]
    assert partial and all("pattern_held" in r for r in partial)
    assert seen and all(held_in == 0 for full, held_in in seen if full)
    held = strategy._full_patterned.clone()
    tensors = strategy.state_tensors()  # what a checkpoint keeps, read back as a resumed run does
    strategy._full_patterned = None
    strategy.load_state(tensors, strategy.state_json())
    assert bool(held.any()) and "full_patterned" in tensors and torch.equal(strategy._full_patterned, held)
    seen.clear()
    Trainer(_cfg(), data, tmp_path / "fresh", strategy=_pattern_strategy()).fit()
    recs = [json.loads(x) for x in (tmp_path / "fresh" / "results.jsonl").read_text().splitlines()]
    assert not any("pattern_held" in r for r in recs)
