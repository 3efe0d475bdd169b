"""SafeCLIP's split: the mixture picks the high component; the safe set grows by s to the cap."""

import pytest
import torch

from clipguard.defenses.split import SafeSetSchedule, fit_gmm, top_fraction_mask
from clipguard.errors import ConfigError


def _two_bumps(n_low=300, n_high=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = 0.1 + 0.05 * torch.randn(n_low, generator=g)
    high = 0.6 + 0.05 * torch.randn(n_high, generator=g)
    return torch.cat([high, low]), torch.cat([torch.ones(n_high), torch.zeros(n_low)]).bool()


def test_mixture_posterior_belongs_to_the_high_similarity_component():
    sims, is_high = _two_bumps()
    p_clean, info = fit_gmm(sims, seed=0)
    assert info.means[1] > info.means[0]
    assert abs(info.means[1] - 0.6) < 0.02 and abs(info.means[0] - 0.1) < 0.02
    assert abs(info.weights[1] - 0.7) < 0.02
    assert float(p_clean[is_high].min()) > 0.9 and float(p_clean[~is_high].max()) < 0.1
    # the labelling must not depend on which component sklearn happens to list first
    p_neg, _ = fit_gmm(-sims + 0.7, seed=0)
    assert float(p_neg[~is_high].min()) > 0.9


def test_first_split_threshold_then_growth_by_step_up_to_cap():
    sims, is_high = _two_bumps()
    p_clean, _ = fit_gmm(sims, seed=0)
    sched = SafeSetSchedule(threshold=0.9, step=0.05, max_fraction=0.8)
    mask, m = sched.first_split(p_clean, sims)
    assert torch.equal(mask, p_clean > 0.9) and m == pytest.approx(0.7, abs=0.01)
    m0, fractions = m, []
    for _ in range(5):
        m = sched.grow(m)
        fractions.append(m)
    assert fractions[:2] == pytest.approx([m0 + 0.05, m0 + 0.10])
    assert max(fractions) == pytest.approx(0.8) and fractions[-1] == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    grown = top_fraction_mask(sims, fractions[0])
    assert int(grown.sum()) == int(fractions[0] * len(sims))
    # the grown set is the highest-similarity pairs
    assert float(sims[grown].min()) >= float(sims[~grown].max())


def test_empty_first_split_uses_the_floor_and_zero_floor_stays_empty():
    g = torch.Generator().manual_seed(1)
    sims = 0.3 + 0.05 * torch.randn(500, generator=g)  # one bump: nothing confidently clean
    p_clean = torch.full((500,), 0.5)
    mask, m = SafeSetSchedule(threshold=0.9).first_split(p_clean, sims)
    assert int(mask.sum()) == 0 and m == 0.0
    mask, m = SafeSetSchedule(threshold=0.9, min_initial_fraction=0.2).first_split(p_clean, sims)
    assert int(mask.sum()) == 100 and m == 0.2
    assert float(sims[mask].min()) >= float(sims[~mask].max())


def test_oversized_first_split_is_cut_to_the_ceiling_of_most_similar_pairs():
    g = torch.Generator().manual_seed(2)
    sims = torch.rand(500, generator=g)
    p_clean = torch.full((500,), 0.95)  # an uninformative mixture calls everything clean
    mask, m = SafeSetSchedule(threshold=0.9).first_split(p_clean, sims)
    assert int(mask.sum()) == 500 and m == 1.0  # the paper's rule alone
    sched = SafeSetSchedule(threshold=0.9, step=0.1, min_initial_fraction=0.2, max_initial_fraction=0.3)
    mask, m = sched.first_split(p_clean, sims)
    assert int(mask.sum()) == 150 and m == 0.3
    assert float(sims[mask].min()) >= float(sims[~mask].max())
    assert sched.grow(m) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="max_initial_fraction"):
        SafeSetSchedule(min_initial_fraction=0.3, max_initial_fraction=0.2)


def test_top_fraction_is_deterministic_under_ties():
    s = torch.tensor([0.5, 0.5, 0.5, 0.1])
    assert top_fraction_mask(s, 0.5).tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        SafeSetSchedule(step=1.5)


def test_phases_are_sized_by_the_budget_when_unset():
    from clipguard.defenses.safeclip import SafeClipOptions

    auto = SafeClipOptions(warmup_epochs=None, clip_warmup_epochs=None, step=None)
    assert auto.plan(10) == (1, 1, 0.25)
    r, c, s = auto.plan(48)
    assert (r, c) == (5, 1) and abs(s - 3 / 42) < 1e-9
    assert auto.plan(20)[:2] == (2, 1)
    assert SafeClipOptions(warmup_epochs=5, clip_warmup_epochs=1, step=0.01).plan(48) == (5, 1, 0.01)


def test_the_defaults_are_the_groups_preset_and_shrink_for_short_runs():
    """The defaults are configs/safeclip-groups.yaml written out, and the presets that pin earlier
    defaults differ from them; a run too short for four CLIP epochs and one mixed epoch gets fewer
    CLIP epochs, down to one, never a run with no split."""
    from pathlib import Path

    from clipguard.defenses.safeclip import SafeClipOptions
    from clipguard.training.spec import load_preset

    configs = Path(__file__).parents[1] / "configs"
    preset = load_preset(configs / "safeclip-groups.yaml")
    assert SafeClipOptions.from_dict(preset["options"]) == SafeClipOptions()
    # the defaults of the forty-fifth round, and those before it, pinned by the presets and grids
    # that measured them: the outlier ceiling and 50 caption groups whatever the data's size
    old_size = dict(safe_size="outlier", pattern_group_pairs=None)
    strikes2 = SafeClipOptions.from_dict(load_preset(configs / "safeclip-strikes2.yaml")["options"])
    assert strikes2 == SafeClipOptions(**old_size)
    nocap = SafeClipOptions.from_dict(load_preset(configs / "safeclip-nocap.yaml")["options"])
    assert nocap == SafeClipOptions(pattern_group_pairs=None)
    z2 = SafeClipOptions.from_dict(load_preset(configs / "safeclip-pat3-unlearn-z2.yaml")["options"])
    assert z2 == SafeClipOptions(density_strikes=1, **old_size)
    # strikes count only with the density veto: without it they stay out of a run's identity
    assert "density_strikes" in SafeClipOptions().identity()
    assert "density_strikes" not in SafeClipOptions(density_z=None).identity()
    assert "density_strikes" not in z2.identity()
    before = dict(density_z=1.0, risky_negatives=False, pattern_z=None, pattern_unlearn=None, pattern_unlearn_z=None,
                  density_strikes=1, **old_size)
    crop50 = SafeClipOptions.from_dict(load_preset(configs / "safeclip-crop50.yaml")["options"])
    assert crop50 == SafeClipOptions(**before)
    aug = SafeClipOptions.from_dict(load_preset(configs / "safeclip-aug.yaml")["options"])
    assert aug == SafeClipOptions(crop_scale_min=0.08, **before)
    d = SafeClipOptions()
    assert d.plan(10)[:2] == (0, 4) and d.plan(48)[:2] == (0, 4)
    assert d.plan(5)[:2] == (0, 4) and d.plan(4)[:2] == (0, 3) and d.plan(2)[:2] == (0, 1)
    # the old defaults (pinned by the grids that measured them) keep their plan
    old = SafeClipOptions(warmup_epochs=None, clip_warmup_epochs=None)
    assert old.plan(10)[:2] == (1, 1) and old.plan(20)[:2] == (2, 1)


def test_mixture_sizing_keeps_the_low_tail_out():
    """80% of pairs look clean, 20% sit far below: however fast the growth, the safe set stops
    at the mixture's clean share minus the margin."""
    from clipguard import defenses

    g = torch.Generator().manual_seed(0)
    sims = torch.cat([0.6 + 0.05 * torch.randn(800, generator=g), 0.1 + 0.05 * torch.randn(200, generator=g)])
    s = defenses.build("safeclip", {"safe_size": "mixture", "mixture_margin": 0.05, "step": 0.5,
                                    "warmup_epochs": 1, "clip_warmup_epochs": 1})
    s._sizer = s.opt.sizer(0.5)
    first = s._decide(sims)
    s._m = first["m"]
    grown = s._decide(sims)
    assert abs(first["log"]["size_ceiling"] - 0.75) < 0.02
    assert grown["m"] <= 0.76 and set(grown["safe_idx"]) <= set(range(800))


def test_relative_score_flags_an_image_that_prefers_other_captions():
    """A pair whose image matches other captions better than its own scores far below a pair of a
    confusable class whose caption is about as good as its class peers'."""
    from types import SimpleNamespace

    from clipguard.defenses.pair_scores import shard_similarities
    from clipguard.training.distributed import DistInfo

    e = torch.eye(4)
    img = torch.stack([e[0], e[1], torch.nn.functional.normalize(e[1] + e[2], dim=0)])
    txt = torch.stack([e[0], e[3], torch.nn.functional.normalize(e[1] + e[2], dim=0)])
    ref = torch.stack([e[0], e[1], e[2]])
    ctx = SimpleNamespace(dist=DistInfo(), device=torch.device("cpu"),
                          encode_dataset=lambda indices: (img[indices], txt[indices]))
    plain = shard_similarities(ctx, torch.arange(3))
    rel = shard_similarities(ctx, torch.arange(3), ref, top_k=1)
    assert torch.allclose(plain, torch.tensor([1.0, 0.0, 1.0]))
    assert rel[1] < -0.9 and rel[0] > -1e-6 and rel[2] > 0.2


def test_joint_density_vetoes_pairs_that_join_an_image_of_one_kind_to_a_caption_of_another():
    """Clean pairs come in look-alike groups (image of kind c with a caption of kind c); poisoned
    pairs join images of many kinds to one target caption, so in the joint space each has few
    look-alikes: its k-th neighbour is far, and the veto keeps it out of the safe set."""
    from types import SimpleNamespace

    from clipguard.defenses.pair_scores import dense_inliers, shard_pair_scores
    from clipguard.defenses.safeclip import SafeClip, SafeClipOptions
    from clipguard.training.distributed import DistInfo

    g = torch.Generator().manual_seed(0)
    kinds = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    src = torch.arange(600) % 6
    img = kinds[src] + 0.05 * torch.randn(600, 16, generator=g)
    txt = kinds[src] + 0.05 * torch.randn(600, 16, generator=g)
    txt[590:] = kinds[0] + 0.05 * torch.randn(10, 16, generator=g)  # ten poisons, all "kind 0"
    img, txt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
    ctx = SimpleNamespace(dist=DistInfo(), device=torch.device("cpu"), raw_model=None,
                          encode_dataset=lambda indices: (img[indices], txt[indices]))
    found = shard_pair_scores(ctx, torch.arange(600), density_k=16, density_reference=400, seed=1)
    sims, log_kd = found.score, found.log_kdist
    dense = dense_inliers(log_kd, 1.0)
    poison = torch.zeros(600, dtype=torch.bool)
    poison[590:] = True
    poison[590:] &= src[590:] != 0  # a poison whose image is of kind 0 is a clean-looking pair
    assert not dense[poison].any()
    assert dense[~poison].float().mean() > 0.8
    # poisons the model has learned look clean to the similarity (here: the highest scores), so
    # a 90% safe set ranked by it holds them all; the veto removes them
    sims[590:] = 2.0
    s = SafeClip(SafeClipOptions(density_z=1.0, safe_size="schedule", min_initial_fraction=0.9,
                                 max_initial_fraction=0.9))
    s._sizer = s.opt.sizer(0.05)
    for veto in (None, dense):
        decision = s._decide(sims, veto)
        safe = torch.zeros(600, dtype=torch.bool)
        safe[decision["safe_idx"]] = True
        if veto is None:
            assert safe[poison].all()
        else:
            assert not (safe & poison).any() and decision["log"]["density_vetoed"] > 0


def test_local_caption_and_image_density_keep_a_diverse_class_the_global_veto_drops_whole():
    """A class of diverse images (noise 0.25 around its centre, the others 0.05) is sparse
    everywhere: the global veto (log k-distance against every pair's) keeps none of it, so it would
    never get the CLIP loss. The local score (against the pair's own neighbours'), the caption
    score (against the pairs with captions like its own) and the global veto sparing pairs as
    sparse as those with images like their own keep most of it and still veto every poison."""
    from types import SimpleNamespace

    from clipguard.defenses.pair_scores import dense_inliers, shard_pair_scores
    from clipguard.training.distributed import DistInfo

    g = torch.Generator().manual_seed(0)
    kinds = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    src = torch.arange(600) % 6
    spread = torch.where(src == 5, 0.25, 0.05)[:, None]
    img = kinds[src] + spread * torch.randn(600, 16, generator=g)
    txt = kinds[src] + 0.05 * torch.randn(600, 16, generator=g)
    txt[590:] = kinds[0] + 0.05 * torch.randn(10, 16, generator=g)  # ten poisons, all "kind 0"
    img, txt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
    ctx = SimpleNamespace(dist=DistInfo(), device=torch.device("cpu"), raw_model=None,
                          encode_dataset=lambda indices: (img[indices], txt[indices]))
    poison = torch.zeros(600, dtype=torch.bool)
    poison[590:] = True
    poison &= src != 0
    diverse = (src == 5) & ~poison
    kept = {}
    for relative_to in ("all", "neighbours", "captions"):
        scores = shard_pair_scores(ctx, torch.arange(600), density_k=16, density_reference=400, seed=1,
                                   density_relative_to=relative_to, density_caption_k=32, density_given_image_k=32)
        kept[relative_to] = dense_inliers(scores.log_kdist, 1.0)
        assert not kept[relative_to][poison].any()
        if relative_to == "all":  # density_given: image, a flagged pair as sparse as its images' pairs is spared
            kept["given-image"] = kept["all"] | dense_inliers(scores.log_kdist_given_image, 1.0)
            assert not kept["given-image"][poison].any()
        else:
            assert scores.log_kdist_given_image is not None  # asked for alongside any score
    assert kept["all"][diverse].float().mean() < 0.05
    # the conditional veto only ever spares: every pair the global one keeps, it keeps
    assert (kept["given-image"] >= kept["all"]).all()
    for relative_to in ("neighbours", "captions", "given-image"):
        assert kept[relative_to][diverse].float().mean() > 0.7 and kept[relative_to][~poison].float().mean() > 0.75


def test_density_memory_keeps_a_vetoed_pair_out_from_the_second_split_on():
    """The first split's verdicts (a barely aligned model) are forgotten; from the second split on
    a vetoed pair stays vetoed even when it later looks dense (a poison being learned)."""
    from clipguard.defenses.safeclip import SafeClip, SafeClipOptions

    def far(i: int) -> torch.Tensor:  # pair i far from the others, the rest alike
        x = torch.zeros(200)
        x[i] = 10.0
        return x + torch.linspace(0, 0.01, 200)

    everyone = torch.arange(200)
    for memory in (False, True):
        s = SafeClip(SafeClipOptions(density_z=1.0, density_memory=memory, density_strikes=1))
        first = s._veto(200, everyone, far(0))            # split 1: pair 0 vetoed, then forgotten
        s._dense = first
        second = s._veto(200, everyone, far(1))           # split 2: pair 1 vetoed
        s._dense = second
        third = s._veto(200, everyone, far(2))            # split 3: pair 2 vetoed; pair 1 looks fine
        assert not first[0] and second[0] and third[0]
        assert not second[1] and not third[2]
        assert bool(third[1]) is (not memory)
    assert s.state_json()["dense_rounds"] == 3


def test_density_strikes_two_forgive_one_veto_and_exclude_for_good_from_the_second():
    """With density_strikes 2 a pair vetoed once (from the second split on) misses only that
    epoch; a second veto excludes it for good, also from epochs that do not re-score it, and the
    count survives a save and load."""
    from clipguard.defenses.nn_pool import NNPool
    from clipguard.defenses.safeclip import SafeClip, SafeClipOptions

    def far(*idx: int) -> torch.Tensor:
        x = torch.linspace(0, 0.01, 200)
        x[list(idx)] = 10.0
        return x

    everyone = torch.arange(200)
    s = SafeClip(SafeClipOptions(density_z=1.0, density_strikes=2))
    s._dense = s._veto(200, everyone, far(0))          # split 1: not counted
    s._dense = s._veto(200, everyone, far(1, 2))       # split 2: pairs 1 and 2 get a strike
    assert not s._dense[1] and not s._dense[2] and s._dense[0]
    s._dense = s._veto(200, everyone, far(2))          # split 3: pair 1 forgiven, pair 2 out
    assert s._dense[1] and not s._dense[2]
    s._img_pool, s._txt_pool = NNPool(4, 8), NNPool(4, 8)
    tensors, meta = s.state_tensors(), s.state_json()
    r = SafeClip(SafeClipOptions(density_z=1.0, density_strikes=2))
    r._img_pool, r._txt_pool = s._img_pool, s._txt_pool
    r.load_state(tensors, meta)
    r._dense = r._veto(200, everyone[100:], far(50)[100:])  # split 4 re-scores only pairs 100-199
    assert not r._dense[2] and r._dense[1]
    r._dense = r._veto(200, everyone, far(1))               # split 5: pair 1's second strike
    assert not r._dense[1] and not r._dense[2] and r._dense[0]
    assert r._strikes[2] == 2 and r._strikes[1] == 2 and r._strikes[0] == 0


def test_density_strikes_one_is_the_union_of_every_verdict():
    """density_strikes 1 (the default before the forty-fifth round) is the memory as it always
    was: any veto from the second split on is final; a state written before strikes were counted
    resumes the same way."""
    from clipguard.defenses.nn_pool import NNPool
    from clipguard.defenses.safeclip import SafeClip, SafeClipOptions

    x = torch.linspace(0, 0.01, 200)
    v = [x.clone() for _ in range(3)]
    for i, t in enumerate(v):
        t[i + 3] = 10.0
    s = SafeClip(SafeClipOptions(density_z=1.0, density_strikes=1))
    for t in v[:2]:
        s._dense = s._veto(200, torch.arange(200), t)
    s._img_pool, s._txt_pool = NNPool(4, 8), NNPool(4, 8)
    legacy = {k: t for k, t in s.state_tensors().items() if k != "strikes"}
    r = SafeClip(SafeClipOptions(density_z=1.0, density_strikes=1))
    r._img_pool, r._txt_pool = NNPool(4, 8), NNPool(4, 8)
    r.load_state(legacy, s.state_json())
    for m in (s, r):
        m._dense = m._veto(200, torch.arange(200), v[2])
        assert m._dense[3] and not m._dense[4] and not m._dense[5]


def test_a_first_veto_the_second_split_does_not_rescore_counts_as_one_strike():
    """With the efficient update the second split re-scores only the top pairs; a pair it skips
    keeps the first split's verdict, which then counts as one strike: final with one strike (the
    memory as it always was), forgiven with two."""
    from clipguard.defenses.safeclip import SafeClip, SafeClipOptions

    def far(i: int) -> torch.Tensor:
        x = torch.linspace(0, 0.01, 200)
        x[i] = 10.0
        return x

    everyone, top = torch.arange(200), torch.arange(100, 200)
    for strikes, back in ((1, False), (2, True)):
        s = SafeClip(SafeClipOptions(density_z=1.0, density_strikes=strikes))
        s._dense = s._veto(200, everyone, far(5))         # split 1: pair 5 vetoed
        s._dense = s._veto(200, top, far(150)[100:])      # split 2: pair 5 not re-scored
        assert not s._dense[5] and not s._dense[150]
        s._dense = s._veto(200, everyone, far(0))         # split 3: pair 5 looks fine
        assert bool(s._dense[5]) is back and bool(s._dense[150]) is back


def test_repeated_image_veto_flags_copies_of_one_image_and_no_clean_pair():
    """Targeted poisoning repeats one target image under many captions: its copies' image
    embeddings coincide, far closer than any two clean images, so the lower tail of the image
    k-distance flags exactly them."""
    from types import SimpleNamespace

    from clipguard.defenses.pair_scores import repeated_images, shard_pair_scores
    from clipguard.defenses.safeclip import SafeClip, SafeClipOptions
    from clipguard.training.distributed import DistInfo

    g = torch.Generator().manual_seed(0)
    kinds = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    src = torch.arange(600) % 6
    img = torch.nn.functional.normalize(kinds[src] + 0.1 * torch.randn(600, 16, generator=g), dim=1)
    img[580:] = img[580]  # twenty copies of one image (under other captions)
    txt = torch.nn.functional.normalize(kinds[src] + 0.1 * torch.randn(600, 16, generator=g), dim=1)
    ctx = SimpleNamespace(dist=DistInfo(), device=torch.device("cpu"), raw_model=None,
                          encode_dataset=lambda indices: (img[indices], txt[indices]))
    found = shard_pair_scores(ctx, torch.arange(600), repeat_k=4, density_reference=600, seed=1)
    log_kd, log_rd = found.log_kdist, found.log_repeat
    assert log_kd is None
    flagged = repeated_images(log_rd, 4.0)
    assert flagged[580:].all() and not flagged[:580].any()
    s = SafeClip(SafeClipOptions(repeat_z=4.0, density_z=None))
    s._dense, s._dense_rounds = None, 0
    verdict = s._veto(600, torch.arange(600), None, log_rd)
    assert torch.equal(verdict, ~flagged) and s._log_repeated == 20


def test_repeat_options_are_validated():
    from clipguard.defenses.safeclip import SafeClipOptions

    with pytest.raises(Exception, match="repeat_z"):
        SafeClipOptions(repeat_z=0.0)
    with pytest.raises(Exception, match="repeat_k"):
        SafeClipOptions(repeat_k=0)
    with pytest.raises(Exception, match="repeat_space"):
        SafeClipOptions(repeat_space="joint")
    with pytest.raises(Exception, match="repeat_grid"):
        SafeClipOptions(repeat_grid=0)
    with pytest.raises(Exception, match="needs the repeated-image veto"):
        SafeClipOptions(repeat_z=None, repeat_space="pixels")
    with pytest.raises(Exception, match="repeat_grid applies"):
        SafeClipOptions(repeat_z=4.0, repeat_grid=4)
    # at their neutral values the new fields leave a run's identity (and cached results) as it was
    base = SafeClipOptions(repeat_z=4.0).identity()
    assert "repeat_space" not in base and "repeat_grid" not in base
    assert SafeClipOptions(repeat_z=4.0, repeat_space="pixels").identity()["repeat_space"] == "pixels"


def _noisy_copies_dataset(jitter: int):
    """600 random 28 px images, the last 20 copies of one image, each with its own uniform noise
    of +-jitter grey levels (the attacker's answer to the embedding veto)."""
    g = torch.Generator().manual_seed(3)
    smooth = torch.nn.functional.interpolate(torch.rand(600, 1, 7, 7, generator=g), size=28,
                                             mode="bilinear", align_corners=False)
    imgs = (smooth * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).clone()
    imgs[580:] = imgs[580]
    noise = torch.randint(-jitter, jitter + 1, imgs[580:].shape, generator=g)
    imgs[580:] = (imgs[580:].to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)
    return imgs


def test_pixel_signatures_average_away_each_copys_noise():
    """Copies with their own noise stay each other's nearest images in the coarse signature,
    nearer than any two different images; a brightness shift of a whole image does not move it."""
    from clipguard.data.signatures import pixel_signatures

    imgs = _noisy_copies_dataset(jitter=32)
    sig = pixel_signatures(imgs, grid=8, batch_size=64)
    assert sig.shape == (600, 64)
    d = torch.cdist(sig, sig)
    d.fill_diagonal_(float("inf"))
    copies_apart = d[580:, 580:].masked_fill(torch.eye(20, dtype=torch.bool), 0).max()
    assert copies_apart < d[:580, :580].min()
    dim = imgs[:5] // 2
    assert torch.allclose(pixel_signatures(dim + 20), pixel_signatures(dim), atol=1e-5)
    picked = pixel_signatures(imgs, indices=torch.tensor([3, 590]), grid=8)
    assert torch.equal(picked, sig[[3, 590]])


def test_repeat_veto_in_pixel_space_flags_noisy_copies_the_embedding_misses():
    """With noise on every copy the embeddings no longer coincide; the pixel signatures still
    put the 20 copies far below every clean image's k-distance, and flag no clean one."""
    from types import SimpleNamespace

    from clipguard.defenses.pair_scores import repeated_images, shard_pair_scores
    from clipguard.training.distributed import DistInfo

    imgs = _noisy_copies_dataset(jitter=32)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(600, 16, generator=g), dim=1)  # noise scatters them
    txt = torch.nn.functional.normalize(torch.randn(600, 16, generator=g), dim=1)
    ctx = SimpleNamespace(dist=DistInfo(), device=torch.device("cpu"), raw_model=None,
                          data=SimpleNamespace(images=imgs),
                          encode_dataset=lambda indices: (img[indices], txt[indices]))
    in_embedding = shard_pair_scores(ctx, torch.arange(600), repeat_k=4, density_reference=600, seed=1).log_repeat
    in_pixels = shard_pair_scores(ctx, torch.arange(600), repeat_k=4, density_reference=600, seed=1,
                                  repeat_grid=8).log_repeat
    assert not repeated_images(in_embedding, 4.0)[580:].any()
    flagged = repeated_images(in_pixels, 4.0)
    assert flagged[580:].all() and not flagged[:580].any()


def test_density_memory_splits_makes_only_the_early_verdicts_final():
    """With density_memory_splits 1 only the second split's vetoes are final; a pair vetoed at
    the third split misses that epoch only, and one vetoed at the second stays out."""
    from clipguard.defenses.safeclip import SafeClip, SafeClipOptions

    def far(*idx: int) -> torch.Tensor:
        x = torch.linspace(0, 0.01, 200)
        x[list(idx)] = 10.0
        return x

    everyone = torch.arange(200)
    for window, back in ((1, True), (None, False)):
        s = SafeClip(SafeClipOptions(density_z=1.0, density_memory_splits=window, density_strikes=1))
        s._dense = s._veto(200, everyone, far(0))      # split 1: not counted
        s._dense = s._veto(200, everyone, far(1))      # split 2: counted either way
        s._dense = s._veto(200, everyone, far(2))      # split 3: counted only without a window
        assert not s._dense[1] and not s._dense[2] and s._dense[0]
        s._dense = s._veto(200, everyone, far(3))      # split 4: pair 2 back with the window
        assert not s._dense[1] and not s._dense[3]
        assert bool(s._dense[2]) is back


def test_density_memory_splits_is_checked():
    from clipguard.defenses.safeclip import SafeClipOptions
    from clipguard.errors import ConfigError

    with pytest.raises(ConfigError, match="density_memory_splits must be >= 1"):
        SafeClipOptions(density_memory_splits=0)


def test_rescored_first_moves_the_stale_pairs_below_every_rescored_one_in_their_own_order():
    from clipguard.defenses.split import rescored_first

    scores = torch.tensor([0.5, 0.9, -0.2, 0.1, 0.3])
    rescored = torch.tensor([True, False, True, False, False])
    out = rescored_first(scores, rescored)
    assert out[rescored].tolist() == pytest.approx([0.5, -0.2])  # the re-scored pairs keep their scores
    assert float(out[~rescored].max()) < float(out[rescored].min())
    assert torch.argsort(out[~rescored]).tolist() == torch.argsort(scores[~rescored]).tolist()
    assert torch.equal(rescored_first(scores, torch.ones(5, dtype=torch.bool)), scores.double())


@pytest.mark.parametrize("ranks", ["together", "rescored-first"])
def test_an_update_takes_its_safe_set_from_the_pairs_it_scored_again(ranks):
    """After a mixed epoch the re-scored pairs score lower on the whole than the scores the other
    pairs kept from the first split. Ranked together, those stale pairs (the first split's riskiest)
    take part of the next safe set; rescored-first takes it from the re-scored pairs."""
    from clipguard import defenses

    g = torch.Generator().manual_seed(0)
    sims = torch.cat([0.2 + 0.05 * torch.randn(600, generator=g) - 0.1,  # re-scored, all a bit lower
                      0.15 + 0.05 * torch.randn(400, generator=g)])       # not re-scored: last split's scores
    rescored = torch.zeros(1000, dtype=torch.bool)
    rescored[:600] = True
    s = defenses.build("safeclip", {"update_ranks": ranks, "safe_size": "schedule", "step": 0.2,
                                    "warmup_epochs": 0, "clip_warmup_epochs": 1})
    s._sizer = s.opt.sizer(0.2)
    s._m = 0.3  # grows to 0.5: 500 pairs, fewer than the 600 re-scored
    d = s._decide(sims, None, rescored if ranks == "rescored-first" else None)
    stale = sum(i >= 600 for i in d["safe_idx"])
    assert len(d["safe_idx"]) == 500
    assert (stale == 0) if ranks == "rescored-first" else (stale > 100)


@pytest.mark.parametrize("counted", [True, False])
def test_pattern_flags_count_as_strikes_only_with_pattern_strikes(counted):
    """A pair the pattern veto flags at two splits is out of both splits' safe sets either way;
    with pattern_strikes it is out for good after the second, without it it is back once unflagged."""
    from clipguard.defenses.safeclip import SafeClip, SafeClipOptions

    dense = torch.linspace(0, 0.01, 200)  # every pair alike: the density veto flags none
    everyone = torch.arange(200)
    flags = torch.zeros(200, dtype=torch.bool)
    flags[7] = True
    s = SafeClip(SafeClipOptions(density_z=3.0, density_strikes=2, pattern_strikes=counted))
    s._dense = s._veto(200, everyone, dense, patterned=flags)  # split 1: not counted
    s._dense = s._veto(200, everyone, dense, patterned=flags)  # split 2
    s._dense = s._veto(200, everyone, dense, patterned=flags)  # split 3
    assert not s._dense[7] and bool(s._dense[torch.arange(200) != 7].all())
    s._dense = s._veto(200, everyone, dense, patterned=torch.zeros(200, dtype=torch.bool))  # unflagged
    assert bool(s._dense[7]) is (not counted)
    assert "pattern_strikes" not in SafeClipOptions().identity()
    assert SafeClipOptions(pattern_strikes=False).identity()["pattern_strikes"] is False


@pytest.mark.parametrize("shrinks", [True, False])
def test_without_safe_set_shrinks_a_falling_ceiling_only_stops_the_growth(shrinks):
    """The safe set holds 90% when the scores' ceiling is re-measured at about 80%: by default the
    set falls to the ceiling; with safe_set_shrinks false it keeps its 90% and grows no further."""
    from clipguard import defenses

    g = torch.Generator().manual_seed(0)
    sims = torch.cat([0.6 + 0.05 * torch.randn(800, generator=g), 0.1 + 0.05 * torch.randn(200, generator=g)])
    s = defenses.build("safeclip", {"safe_size": "outlier", "safe_set_shrinks": shrinks, "step": 0.05,
                                    "warmup_epochs": 1, "clip_warmup_epochs": 1})
    s._sizer = s.opt.sizer(0.05)
    s._m = 0.9
    d = s._decide(sims)
    assert d["log"]["size_ceiling"] < 0.85
    assert d["m"] == (pytest.approx(d["log"]["size_ceiling"]) if shrinks else pytest.approx(0.9))


@pytest.mark.parametrize("entry", ["ranking", "consensus"])
def test_with_consensus_an_update_takes_only_pairs_the_last_split_also_ranked_high(entry):
    """Pairs 0-199 ranked low at the last split and jump to the top now (a blurred ranking): by
    default they take 200 of the new safe set's 500 places; with consensus only pairs high at both
    splits enter."""
    from clipguard import defenses

    g = torch.Generator().manual_seed(0)
    last = torch.cat([torch.full((200,), -1.0), torch.rand(800, generator=g)])
    now = torch.cat([torch.full((200,), 2.0), torch.rand(800, generator=g)])
    s = defenses.build("safeclip", {"update_entry": entry, "safe_size": "schedule", "step": 0.2,
                                    "warmup_epochs": 0, "clip_warmup_epochs": 1})
    s._sizer = s.opt.sizer(0.2)
    s._m, s._sims = 0.3, last  # grows to 0.5: 500 pairs of this split's ranking
    d = s._decide(now, None)
    jumped = sum(i < 200 for i in d["safe_idx"])
    if entry == "ranking":
        assert len(d["safe_idx"]) == 500 and jumped == 200
    else:
        assert jumped == 0 and 0 < len(d["safe_idx"]) < 500
        assert d["log"]["consensus_dropped"] == 500 - len(d["safe_idx"])
    assert ("update_entry" in s.opt.identity()) is (entry == "consensus")


@pytest.mark.parametrize("spare", [None, 1.0])
def test_with_tail_pattern_z_the_tail_enters_but_its_patterned_pairs(spare):
    """Pairs 0-99 score far below the rest (the outlier rule's tail); 0-49 of them carry their group's
    pattern (faint). The ceiling keeps the whole tail out; with tail_pattern_z the set grows past it
    and only the patterned tail pairs stay out."""
    from clipguard import defenses

    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.full((100,), -5.0), torch.rand(900, generator=g)])
    faint = torch.zeros(1000, dtype=torch.bool)
    faint[:50] = True
    faint[500:520] = True  # patterned pairs outside the tail: the veto's business, not the tail's
    s = defenses.build("safeclip", {"safe_size": "outlier", "tail_pattern_z": spare, "step": 0.5,
                                    "warmup_epochs": 0, "clip_warmup_epochs": 1})
    s._sizer = s.opt.sizer(0.5)
    s._m, s._sims = 0.5, scores  # grows to 1.0
    d = s._decide(scores, None, None, faint if spare is not None else None)
    safe = set(d["safe_idx"])
    if spare is None:
        assert not safe & set(range(100)) and len(safe) == 900
    else:
        assert not safe & set(range(50)) and set(range(50, 100)) <= safe
        assert set(range(500, 520)) <= safe and len(safe) == 950
        assert d["log"]["tail_kept_out"] == 50
    assert ("tail_pattern_z" in s.opt.identity()) is (spare is not None)


def test_tail_pattern_z_needs_the_outlier_ceiling_and_the_pattern_veto():
    from clipguard import defenses

    for bad in ({"safe_size": "schedule"}, {"pattern_z": None}):
        with pytest.raises(ConfigError, match="tail_pattern_z"):
            defenses.build("safeclip", {"tail_pattern_z": 1.0, **bad})


def test_the_relative_scores_reference_comes_from_the_splits_own_encode(fm_train):
    """The reference captions' features are taken from the split's fresh features of the scored
    pairs when it holds them all, and encoded when it does not: the same features either way."""
    from types import SimpleNamespace

    from clipguard.defenses.pair_scores import _reference_features
    from clipguard.evaluation.features import encode_tokens
    from clipguard.models.factory import create_model, get_tokenizer

    model = create_model("cg-tiny")
    model = model[0] if isinstance(model, tuple) else model
    data = fm_train.subset(range(64))
    tokens = get_tokenizer("cg-tiny")(list(data.captions))
    ctx = SimpleNamespace(data=data, tokens=tokens, raw_model=model, device=torch.device("cpu"))
    mine = torch.arange(0, 64, 2)
    txt = encode_tokens(model, tokens[mine], "cpu")
    inside, outside = torch.tensor([4, 0, 62, 4]), torch.tensor([4, 5])
    assert torch.equal(_reference_features(ctx, inside, mine, txt), txt[torch.tensor([2, 0, 31, 2])])
    got = _reference_features(ctx, outside, mine, txt)
    assert torch.allclose(got, encode_tokens(model, tokens[outside], "cpu"), atol=1e-6, rtol=0)
    assert torch.allclose(_reference_features(ctx, inside, mine, None), txt[torch.tensor([2, 0, 31, 2])],
                          atol=1e-6, rtol=0)
