"""Detectors, the chunked neighbour search, keep rules and detection metrics on synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clipguard.detection import DETECTORS, PairFeatures, build, knn
from clipguard.detection.base import fraction_keep, robust_keep, veto_keep
from clipguard.detection.density import lid_mle
from clipguard.detection.metrics import (
    auprc,
    auroc,
    detection_metrics,
    grouped_metrics,
    precision_at_k,
    tpr_at_fpr,
)
from clipguard.detection.search import NeighbourSearch
from clipguard.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLEAN, N_POISON, DIM = 300, 16, 32


@pytest.fixture(scope="module")
def planted():
    """Clean pairs on a 4-dimensional subspace with matching captions; a planted cluster of
    poisons spread in all 32 dimensions (sparse, high-dimensional) with unrelated captions."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(DIM, 4, generator=g)
    clean = torch.randn(N_CLEAN, 4, generator=g) @ basis.T + 0.05 * torch.randn(N_CLEAN, DIM, generator=g)
    poison = 0.5 * torch.randn(DIM, generator=g) + torch.randn(N_POISON, DIM, generator=g)
    image = torch.cat([clean, poison])
    text = torch.cat([clean + 0.1 * torch.randn(N_CLEAN, DIM, generator=g), torch.randn(N_POISON, DIM, generator=g)])
    labels = np.r_[np.zeros(N_CLEAN, dtype=bool), np.ones(N_POISON, dtype=bool)]
    return image, text, labels


def test_every_detector_is_registered():
    assert set(DETECTORS.names()) == {"similarity", "mixture", "kdist", "lid", "slof", "dao", "iforest",
                                      "caption-agreement", "repeat", "spectral", "ensemble", "shift", "pattern"}


@pytest.mark.parametrize("name", ["similarity", "mixture", "kdist", "lid", "slof", "dao", "iforest",
                                  "caption-agreement"])
def test_detector_scores_the_planted_pairs_highest(planted, name):
    image, text, labels = planted
    det = build(name)
    scores = det.score(PairFeatures(image, text))
    assert scores.shape == (N_CLEAN + N_POISON,) and np.isfinite(scores).all()
    assert auroc(scores, labels) > 0.9
    keep = det.keep_rule(scores)
    assert keep.mask.dtype == bool and keep.mask.shape == scores.shape
    assert keep.mask[~labels].mean() > 0.5  # the default rule keeps most clean pairs


def test_caption_agreement_finds_mislabelled_pairs_inside_dense_clusters():
    """Poisons whose images sit INSIDE a dense class cluster (no density signal) but carry another
    class's caption: only the captions of their image neighbours give them away."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, DIM, generator=g) * 3
    cls = torch.arange(400) % 5
    image = centres[cls] + 0.3 * torch.randn(400, DIM, generator=g)
    caption_cls = cls.clone()
    poison = torch.zeros(400, dtype=torch.bool)
    poison[:20] = True
    caption_cls[:20] = (cls[:20] + 1) % 5  # an image of class c captioned as class c + 1
    text = centres[caption_cls] + 0.3 * torch.randn(400, DIM, generator=g)
    feats = PairFeatures(image, text, similarity=torch.zeros(400))  # no CLIP-score signal either
    labels = poison.numpy()
    assert auroc(build("caption-agreement").score(feats), labels) > 0.99
    assert auroc(build("kdist").score(feats), labels) < 0.8  # the density sees nothing unusual
    # scored block by block (a million pairs' neighbour captions do not fit at once): the same scores
    blocks = PairFeatures(image, text, similarity=torch.zeros(400), search=NeighbourSearch(chunk=7))
    assert np.array_equal(build("caption-agreement").score(blocks), build("caption-agreement").score(feats))


def test_spectral_finds_a_triggered_group_that_density_finds_normal():
    """Five caption classes, each spread along four directions of its own; 24 poisons captioned
    as class 0 share a trigger shift and sit tightly together, so k-distance (k = 16) finds them
    the densest pairs. Among the pairs captioned as class 0 the shift is the top principal
    direction, which spectral scores."""
    from clipguard.detection.detectors.spectral import caption_groups

    g = torch.Generator().manual_seed(4)
    centres = torch.randn(5, DIM, generator=g) * 3
    dirs = torch.linalg.qr(torch.randn(5, DIM, 4, generator=g))[0]
    cls = torch.arange(424) % 5
    cls[400:] = 0
    coef = 0.5 * torch.randn(424, 4, generator=g)
    coef[400:] *= 0.3
    image = centres[cls] + torch.einsum("ndk,nk->nd", dirs[cls], coef) + 0.05 * torch.randn(424, DIM, generator=g)
    image[400:] += 1.5 * torch.nn.functional.normalize(torch.randn(DIM, generator=g), dim=0)
    text = centres[cls] + 0.1 * torch.randn(424, DIM, generator=g)
    labels = np.r_[np.zeros(400, dtype=bool), np.ones(24, dtype=bool)]
    feats = PairFeatures(image, text)
    det = build("spectral", {"clusters": 5, "components": 1})
    scores = det.score(feats)
    assert scores.shape == (424,) and np.isfinite(scores).all()
    assert auroc(scores, labels) > 0.95
    assert auroc(build("kdist").score(feats), labels) < 0.1  # a tight group looks dense
    assert auroc(build("spectral").score(feats), labels) > 0.6  # the defaults (50 groups, 10 directions)
    keep = det.keep_rule(scores).mask
    assert keep[labels].mean() < 0.2 and keep[~labels].mean() > 0.9
    # the groups are the caption classes, seeded, and the same when k-means is fitted on a sample
    groups = caption_groups(feats.text.double().numpy(), 5, seed=0, max_points=10_000)
    assert len(set(zip(groups.tolist(), cls.tolist()))) == 5
    sampled = caption_groups(feats.text.double().numpy(), 5, seed=0, max_points=200)
    assert len(set(zip(sampled.tolist(), groups.tolist()))) == 5  # the same partition, other numbering


def _shifted_pairs():
    """Five content classes. The reference model places every image among its class; the model
    under scan does too, except for 24 poisons (true classes 1-4, captioned as class 0) that it
    has pulled into one tight cluster beside class 0, as a learnt trigger does. Under the scanned
    model alone the poisons are dense and sit with the captions they carry."""
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(5, DIM, generator=g) * 3
    cls = torch.arange(424) % 5
    cls[400:] = 1 + torch.arange(24) % 4
    reference = centres[cls] + 0.6 * torch.randn(424, DIM, generator=g)
    scanned = centres[cls] + 0.6 * torch.randn(424, DIM, generator=g)
    scanned[400:] = centres[0] + 0.5 + 0.05 * torch.randn(24, DIM, generator=g)
    captioned = cls.clone()
    captioned[400:] = 0
    text = centres[captioned] + 0.1 * torch.randn(424, DIM, generator=g)
    labels = np.r_[np.zeros(400, dtype=bool), np.ones(24, dtype=bool)]
    return PairFeatures(scanned, text, reference=PairFeatures(reference, text)), labels


def test_shift_finds_what_a_model_moved_away_from_its_reference_neighbours():
    feats, labels = _shifted_pairs()
    det = build("shift")
    scores = det.score(feats)
    assert scores.shape == (424,) and np.isfinite(scores).all()
    assert auroc(scores, labels) > 0.99
    assert auroc(build("kdist").score(feats), labels) < 0.1        # dense under the scanned model
    assert auroc(build("caption-agreement", {"k": 16}).score(feats), labels) < 0.7  # and captioned like it
    # by hand for one pair: its 16 nearest images under the reference, its joint distance to them here
    i = 410
    ref_img = feats.reference.image
    near = torch.argsort(((ref_img - ref_img[i]) ** 2).sum(1))[1:17]
    joint = feats.space("joint")
    assert scores[i] == pytest.approx(float(1 - (joint[near] @ joint[i]).mean()), abs=1e-5)
    image_only = build("shift", {"space": "image", "k": 4}).score(feats)
    assert auroc(image_only, labels) > 0.99
    keep = det.keep_rule(scores).mask
    assert not keep[labels].any() and keep[~labels].mean() > 0.8  # the robust rule, z = 3


def test_shift_with_the_reference_baseline_discounts_a_class_that_is_loose_under_both_models():
    """Class 4 is spread wide under both models, so its clean pairs sit far from their reference
    neighbours under the scanned model too, as far as the 24 poisons moved: plain shift confuses
    them; subtracting the reference's own distance to the same neighbours leaves the move alone."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(5, DIM, generator=g) * 3
    cls = torch.arange(424) % 5
    cls[400:] = 1 + torch.arange(24) % 3
    spread = torch.where(cls == 4, 3.0, 0.6).unsqueeze(1)
    reference = centres[cls] + spread * torch.randn(424, DIM, generator=g)
    scanned = centres[cls] + spread * torch.randn(424, DIM, generator=g)
    scanned[400:] += 0.5 * (centres[0] - centres[cls[400:]])  # carried halfway towards class 0
    text = centres[torch.where(torch.arange(424) >= 400, 0, cls)] + 0.1 * torch.randn(424, DIM, generator=g)
    feats = PairFeatures(scanned, text, reference=PairFeatures(reference, text))
    labels = np.r_[np.zeros(400, dtype=bool), np.ones(24, dtype=bool)]
    plain = build("shift", {"space": "image"}).score(feats)
    based = build("shift", {"space": "image", "baseline": "reference"}).score(feats)
    assert auroc(plain, labels) < 0.9 < 0.99 < auroc(based, labels)
    # by hand for one pair: the scanned distance minus the reference's, to the same 16 neighbours
    i = 405
    ref_img = feats.reference.image
    near = torch.argsort(((ref_img - ref_img[i]) ** 2).sum(1))[1:17]
    want = (1 - (feats.image[near] @ feats.image[i]).mean()) - (1 - (ref_img[near] @ ref_img[i]).mean())
    assert based[i] == pytest.approx(float(want), abs=1e-5)
    with pytest.raises(ConfigError, match="option 'baseline' must be one of 'none', 'reference'"):
        build("shift", {"baseline": "scanned"})


def test_shift_needs_a_reference_and_says_how_to_give_one():
    from clipguard.detection.runner import resolve_detectors

    feats, _ = _shifted_pairs()
    with pytest.raises(ConfigError, match="--reference CHECKPOINT"):
        build("shift").score(PairFeatures(feats.image, feats.text))
    with pytest.raises(ConfigError, match="detector 'shift' compares the model with a reference model"):
        resolve_detectors(["kdist", "shift"])
    with pytest.raises(ConfigError, match="detector 'ensemble' compares"):
        resolve_detectors(["ensemble"], {"ensemble": {"members": "caption-agreement,shift"}})
    assert "shift" not in [d.name for d in resolve_detectors()]          # the default set, no reference
    assert "shift" in [d.name for d in resolve_detectors(reference=True)]
    with pytest.raises(ConfigError, match="option 'space' must be one of 'image', 'text', 'joint'"):
        build("shift", {"space": "pixels"})
    with pytest.raises(ValueError, match="reference features hold 3 pairs"):
        PairFeatures(feats.image, feats.text, reference=PairFeatures(feats.image[:3], feats.text[:3]))


def test_search_cost_counts_each_search_a_detector_reads_once():
    feats, _ = _shifted_pairs()
    ens = build("ensemble", {"members": "caption-agreement,shift,kdist"})
    ens.scores(feats)
    ca = build("caption-agreement").neighbour_key()
    kd = build("kdist").neighbour_key()
    own = {ca: feats.search_cost(*ca), kd: feats.search_cost(*kd)}      # one search if the keys agree
    ref = feats.reference.search_cost(build("shift").opt.reference_space, "l2")
    assert ref > 0 and all(v > 0 for v in own.values())
    assert ens.search_cost(feats) == pytest.approx(sum(own.values()) + ref)
    assert build("shift").search_cost(feats) == pytest.approx(ref)
    assert build("shift").search_cost(PairFeatures(feats.image, feats.text)) == 0.0


def test_ensemble_averages_its_members_ranks_and_keeps_what_all_keep(planted):
    from clipguard.detection.runner import rank_shares

    image, text, labels = planted
    feats = PairFeatures(image, text)
    det = build("ensemble", {"members": "similarity, kdist"})
    scores = det.scores(feats)
    sim, kd = build("similarity").score(feats), build("kdist").score(feats)
    np.testing.assert_allclose(scores, (rank_shares(sim) + rank_shares(kd)) / 2)
    assert auroc(scores, labels) > 0.9
    keep = det.keep_rule(scores)
    both = build("similarity").keep_rule(sim).mask & build("kdist").keep_rule(kd).mask
    assert (keep.mask == both).all() and keep.rule["rule"] == "every_member"
    assert [m["detector"] for m in keep.rule["members"]] == ["similarity", "kdist"]
    assert det.keep_rule(scores[::-1].copy()).rule["rule"] == "robust_z"  # not its own scores: no member rules
    assert build("ensemble").opt.member_names() == ["caption-agreement", "spectral"]
    for bad, msg in (("similarity", "at least two"), ("similarity,similarity", "twice"),
                     ("similarity,ensemble", "unknown detector 'ensemble'"), ("similarity,daoo", "unknown detector 'daoo'")):
        with pytest.raises(ConfigError, match=msg):
            build("ensemble", {"members": bad})


def test_spectral_degenerate_groups_and_options():
    from clipguard.detection.detectors.spectral import caption_groups, spectral_scores

    # one caption encoded in batches of other shapes differs in the last bits: still one group
    text = np.tile(np.random.default_rng(1).normal(size=(2, DIM)), (30, 1)) + 1e-7 * np.random.default_rng(2).normal(size=(60, DIM))
    assert len(np.unique(caption_groups(text, 50, seed=0, max_points=100))) == 2
    assert len(np.unique(caption_groups(text, 50, seed=0, max_points=10))) == 2  # the sample, not all pairs, caps k
    image, text_t = torch.randn(40, DIM), torch.randn(40, DIM)
    image[3] = float("nan")
    text_t[5] = float("nan")
    s = build("spectral", {"clusters": 3}).score(PairFeatures(image, text_t, similarity=torch.zeros(40)))
    assert np.isfinite(s).all() and s[3] == s[5] == s.max()  # a broken pair ranks first, never breaks the scan

    same = PairFeatures(torch.randn(50, DIM), torch.ones(50, DIM))  # one caption: one group
    assert np.isfinite(build("spectral").score(same)).all()
    x = np.random.default_rng(0).normal(size=(7, 4))
    s = spectral_scores(x, np.array([0, 0, 0, 0, 0, 0, 1]), components=2)
    assert s[-1] == 0.0 and np.median(s[:6]) == pytest.approx(1.0)  # a lone pair scores 0; a group's median is 1
    with pytest.raises(ConfigError, match="'clusters' must be >= 1"):
        build("spectral", {"clusters": 0})
    with pytest.raises(ConfigError, match="'space' must be"):
        build("spectral", {"space": "pixels"})


def test_repeat_flags_the_copies_of_a_repeated_image_that_density_finds_normal():
    """A TDPA target repeated under 12 captions: its copies are each other's nearest neighbours
    at distance 0, the densest neighbourhood in the data, so k-distance calls them the most
    normal pairs; repeat scores them highest and its keep rule drops them."""
    g = torch.Generator().manual_seed(2)
    image = torch.randn(300, DIM, generator=g)
    image[288:] = image[288]  # one image, 12 copies
    text = torch.randn(300, DIM, generator=g)
    feats = PairFeatures(image, text)
    labels = np.r_[np.zeros(288, dtype=bool), np.ones(12, dtype=bool)]
    scores = build("repeat").score(feats)
    assert auroc(scores, labels) == 1.0
    assert auroc(build("kdist").score(feats), labels) < 0.1  # copies look the least sparse
    keep = build("repeat").keep_rule(scores).mask
    assert not keep[labels].any() and keep[~labels].mean() > 0.95


def test_a_repeat_veto_drops_the_copies_a_general_ranking_keeps():
    """Copies of one image captioned as another class: caption agreement with a k below the
    number of copies sees them agree with each other and keeps them; a repeat veto added to its
    keep rule drops every copy, and the record says how many it alone removed."""
    from clipguard.detection.runner import scan_features

    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, DIM, generator=g) * 3
    cls = torch.arange(320) % 4
    image = centres[cls] + 0.4 * torch.randn(320, DIM, generator=g)
    image[300:] = image[300]  # one image of class 0 (row 300 is class 0), 20 copies
    text_cls = cls.clone()
    text_cls[300:] = 1        # ... each captioned as class 1
    text = centres[text_cls] + 0.4 * torch.randn(320, DIM, generator=g)
    labels = np.r_[np.zeros(300, dtype=bool), np.ones(20, dtype=bool)]
    dets = [build("caption-agreement", {"k": 8}), build("repeat")]
    plain = scan_features(PairFeatures(image, text), dets, keep_detector="caption-agreement",
                          keep_fraction=0.9, progress=False)
    vetoed = scan_features(PairFeatures(image, text), dets, keep_detector="caption-agreement",
                           keep_fraction=0.9, veto_detectors=["repeat"], progress=False)
    assert plain.keep.mask[labels].sum() >= 10          # the ranking alone keeps most copies
    assert not vetoed.keep.mask[labels].any()            # the veto drops them all
    assert (vetoed.keep.mask == (plain.keep.mask & vetoed.run("repeat").keep.mask)).all()
    info = vetoed.keep.rule["vetoes"][0]
    assert vetoed.keep.rule["rule"] == "fraction" and info["detector"] == "repeat"
    assert info["dropped_by_it_alone"] == int(plain.keep.mask.sum() - vetoed.keep.mask.sum())
    with pytest.raises(ConfigError, match="--veto-detector 'repeat' is the keep detector"):
        scan_features(PairFeatures(image, text), dets, keep_detector="repeat", veto_detectors=["repeat"],
                      progress=False)
    with pytest.raises(ConfigError, match="--veto-detector 'dao' is not among the detectors run"):
        scan_features(PairFeatures(image, text), dets, veto_detectors=["dao"], progress=False)


def test_veto_keep_intersects_and_records_each_veto():
    primary = fraction_keep(np.arange(10.0), 0.8)           # drops rows 8, 9
    a = robust_keep(np.r_[np.zeros(9), 100.0], 3.0)          # rejects row 9
    b = robust_keep(np.r_[100.0, np.zeros(9)], 3.0)          # rejects row 0
    out = veto_keep(primary, {"a": a, "b": b})
    assert out.mask.tolist() == [False] + [True] * 7 + [False, False]
    assert [(v["detector"], v["rejected"], v["dropped_by_it_alone"]) for v in out.rule["vetoes"]] == \
        [("a", 1, 0), ("b", 1, 1)]
    assert primary.mask.sum() == 8  # the primary decision is untouched


def test_repeat_in_pixel_space_flags_copies_whose_noise_scatters_their_embeddings():
    """Each copy with its own noise: in the embedding they are scattered like any other image, in
    the coarse pixel signatures they stay each other's nearest; without signatures the space is
    a clear error."""
    from clipguard.data.signatures import pixel_signatures

    g = torch.Generator().manual_seed(4)
    smooth = torch.nn.functional.interpolate(torch.rand(300, 1, 7, 7, generator=g), size=28, mode="bilinear",
                                             align_corners=False)
    imgs = (smooth * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).clone()
    imgs[288:] = imgs[288]
    noise = torch.randint(-32, 33, imgs[288:].shape, generator=g)
    imgs[288:] = (imgs[288:].to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)
    image, text = torch.randn(300, DIM, generator=g), torch.randn(300, DIM, generator=g)
    labels = np.r_[np.zeros(288, dtype=bool), np.ones(12, dtype=bool)]
    feats = PairFeatures(image, text, pixels=pixel_signatures(imgs))
    assert auroc(build("repeat").score(feats), labels) < 0.8
    det = build("repeat", {"space": "pixels", "z": 4.0})
    scores = det.score(feats)
    assert auroc(scores, labels) == 1.0
    keep = det.keep_rule(scores).mask
    assert not keep[labels].any() and keep[~labels].all()
    with pytest.raises(ConfigError, match="pixel signatures"):
        det.score(PairFeatures(image, text))
    with pytest.raises(ConfigError, match="metric 'l2'"):
        build("repeat", {"space": "pixels", "metric": "cosine"})


@pytest.mark.parametrize("space", ["text", "joint"])
def test_density_detectors_work_in_every_space(planted, space):
    image, text, labels = planted
    scores = build("dao", {"space": space, "k": "8"}).score(PairFeatures(image, text))
    assert auroc(scores, labels) > 0.9


def test_density_detectors_share_one_neighbour_search(planted):
    image, text, _ = planted
    f = PairFeatures(image, text)
    for name in ("kdist", "lid", "slof", "dao"):
        build(name).score(f)
    build("kdist", {"k": 8}).score(f)  # a smaller k reads the same search
    assert list(f._cache) == [("image", "l2")] and f._cache[("image", "l2")].distances.shape[1] == 16


def test_dao_and_slof_match_their_formulas(planted):
    image, text, _ = planted
    x = torch.nn.functional.normalize(image, dim=1).double()
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    k = 16
    dist, idx = d.sort(dim=1)
    dist, idx = dist[:, :k], idx[:, :k]
    dk = dist[:, -1]
    lid = -1.0 / torch.log(dist / dk[:, None]).mean(dim=1)
    dao = (lid[idx] * torch.log(dk[:, None] / dk[idx])).mean(dim=1)
    slof = (dk[:, None] / dk[idx]).mean(dim=1)
    f = PairFeatures(image, text)
    np.testing.assert_allclose(build("dao").score(f), dao.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(build("slof").score(f), slof.numpy(), rtol=1e-4)
    np.testing.assert_allclose(build("kdist").score(f), dk.numpy(), rtol=1e-4)


def test_lid_mle_by_hand():
    # distances 1, 2, 4: mean of -log(d_i / d_k) = (log 4 + log 2 + 0) / 3 = log 2
    assert lid_mle(torch.tensor([[1.0, 2.0, 4.0]])).item() == pytest.approx(1 / math.log(2), rel=1e-6)
    assert math.isfinite(lid_mle(torch.tensor([[3.0, 3.0, 3.0]])).item())   # all equal: capped
    assert math.isfinite(lid_mle(torch.tensor([[0.0, 0.0, 1.0]])).item())   # duplicates


# ---------------------------------------------------------------------------- knn
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_chunked_knn_equals_brute_force(metric):
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(203, 24, generator=g), dim=1)
    r = torch.nn.functional.normalize(torch.randn(517, 24, generator=g), dim=1)
    d, i = knn(q, r, 9, metric=metric, chunk=37, ref_chunk=53)
    full = torch.cdist(q.double(), r.double())
    if metric == "cosine":
        full = full ** 2 / 2  # 1 - cos of unit vectors
    want_d, want_i = full.sort(dim=1)
    assert torch.equal(i, want_i[:, :9])
    torch.testing.assert_close(d.double(), want_d[:, :9], atol=1e-5, rtol=1e-5)


def test_knn_excludes_self_across_chunks():
    g = torch.Generator().manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(150, 8, generator=g), dim=1)
    d, i = knn(x, x, 5, exclude_self=True, chunk=16, ref_chunk=23, metric="l2")
    full = torch.cdist(x.double(), x.double())
    full.fill_diagonal_(float("inf"))
    want_d, want_i = full.sort(dim=1)
    assert not (i == torch.arange(150)[:, None]).any()
    assert torch.equal(i, want_i[:, :5])
    torch.testing.assert_close(d.double(), want_d[:, :5], atol=1e-5, rtol=1e-5)
    one_chunk = knn(x, x, 5, exclude_self=True, metric="l2")
    assert torch.equal(one_chunk[1], i)


def test_knn_refuses_bad_arguments():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k must be in"):
        knn(x, x, 10, exclude_self=True)
    with pytest.raises(ValueError, match="same d"):
        knn(x, torch.randn(10, 5), 3)
    with pytest.raises(ValueError, match="exclude_self"):
        knn(x, torch.randn(11, 4), 3, exclude_self=True)


# ---------------------------------------------------------------------------- keep rules, options
def test_robust_keep_rule():
    scores = np.r_[np.arange(11, dtype=float), 100.0]  # median 5.5, MAD 3
    keep = robust_keep(scores, z=3.0)
    assert keep.rule["threshold"] == pytest.approx(5.5 + 3 * 1.4826 * 3)
    assert keep.mask.tolist() == [True] * 11 + [False]
    assert robust_keep(np.ones(5), 3.0).kept == 5  # no spread at all: keep everything


def test_fraction_keep_keeps_the_lowest_scores():
    keep = fraction_keep(np.array([0.5, 0.1, 0.9, 0.3]), 0.5)
    assert keep.mask.tolist() == [False, True, False, True] and keep.rule["rule"] == "fraction"
    with pytest.raises(ConfigError, match="keep-fraction"):
        fraction_keep(np.zeros(3), 0.0)


def test_mixture_keeps_its_split(planted):
    image, text, labels = planted
    det = build("mixture", {"threshold": 0.5})
    keep = det.keep_rule(det.score(PairFeatures(image, text)))
    assert keep.rule["rule"] == "mixture" and "gmm_mean_high" in keep.rule
    assert not keep.mask[labels].any() and keep.mask[~labels].mean() > 0.9


def test_bad_detector_and_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown detector .nope.; choose one of: caption-agreement, dao"):
        build("nope")
    with pytest.raises(ConfigError, match=r"detector 'dao' has no option 'kk' \(did you mean 'k'\?\)"):
        build("dao", {"kk": 3})
    with pytest.raises(ConfigError, match="detector 'lid': option 'space' must be one of"):
        build("lid", {"space": "audio"})
    with pytest.raises(ConfigError, match="option 'k' must be >= 2"):
        build("kdist", {"k": 1})
    with pytest.raises(ConfigError, match="needs more than"):
        build("kdist", {"k": 16}).score(PairFeatures(torch.randn(10, 4), torch.randn(10, 4)))


# ---------------------------------------------------------------------------- metrics
def test_metrics_match_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.1
    s = rng.normal(size=400) + 1.5 * y
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert auprc(s, y) == pytest.approx(average_precision_score(y, s))
    m = detection_metrics(s, y)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s)) and m["n_poison"] == int(y.sum())
    assert math.isnan(auroc(s, np.zeros(400)))
    assert detection_metrics(s, np.zeros(400))["auroc"] is None


def test_tpr_at_1pct_fpr_and_precision_at_k_by_hand():
    # 200 clean pairs scored 0..199 and 4 poisons: at most 2 clean pairs (1%) may be flagged, so
    # the threshold is 198, which flags the poisons scored 500, 400 and 198.5 but not 50: 3/4
    clean = np.arange(200, dtype=float)
    scores = np.r_[clean, [500.0, 400.0, 198.5, 50.0]]
    labels = np.r_[np.zeros(200), np.ones(4)]
    assert tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.75)
    assert precision_at_k(scores, labels) == pytest.approx(0.75)  # top 4: 500, 400, 199, 198.5
    assert precision_at_k([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == 0.5


def test_grouped_metrics_score_each_part_against_the_clean_pairs():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.15, 0.05])
    poisoned = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    parts = {"easy": np.array([0, 0, 0, 0, 1, 1, 0, 0], bool), "hidden": np.array([0, 0, 0, 0, 0, 0, 1, 1], bool)}
    out = grouped_metrics(scores, poisoned, parts)
    assert out["parts"]["easy"]["auroc"] == 1.0 and out["parts"]["easy"]["n"] == 6
    assert out["parts"]["hidden"]["auroc"] == pytest.approx(1 / 8)
    assert out["auroc"] == pytest.approx(auroc(scores, poisoned))
    json.dumps(out)  # plain numbers only


def test_manifest_parts_follow_the_recorded_triggers(tmp_path):
    from clipguard.data.csv_dataset import ImageCaptionData
    from clipguard.detection.runner import manifest_masks

    manifest = {"attack": "multi", "params": {}, "seed": 0, "target": {"index": 0}, "target_captions": [],
                "poisoned_rows": [1, 4, 5], "poison_triggers": ["badnet", "sig", "badnet"], "mode": "replace",
                "source_csv": "/elsewhere/train.csv", "source_sha256": "", "clipguard_version": "0", "n_rows": 6}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    data = ImageCaptionData(images=torch.zeros(6, 3, 2, 2, dtype=torch.uint8), captions=["c"] * 6,
                            labels=torch.zeros(6, dtype=torch.long), paths=[""] * 6, rows=[2, 3, 4, 5, 6, 7],
                            n_source_rows=6)
    poisoned, parts, _ = manifest_masks(tmp_path / "manifest.json", data)
    assert poisoned.tolist() == [False, True, False, False, True, True]
    assert parts["badnet"].tolist() == [False, True, False, False, False, True]
    assert parts["sig"].tolist() == [False, False, False, False, True, False]


def test_euclidean_knn_measures_vectors_as_they_are():
    """Unnormalised vectors (pixel signatures): the same neighbours and distances as torch.cdist,
    across query and reference chunks."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 6, generator=g) * torch.rand(70, 1, generator=g) * 3
    d, i = knn(x, x, 5, metric="euclidean", exclude_self=True, chunk=16, ref_chunk=24)
    full = torch.cdist(x.double(), x.double())
    full.fill_diagonal_(float("inf"))
    want_d, want_i = full.topk(5, dim=1, largest=False)
    assert torch.equal(i, want_i)
    assert torch.allclose(d.double(), want_d, atol=1e-4)


def test_caption_relative_scores_stop_a_hard_class_outranking_the_poisons():
    """Three kinds of pairs; the clean pairs of kind 2 agree poorly with their captions (noisy
    images), worse than ten poisons (kind-1 images captioned as kind 0). Scored as they are, that
    whole class outranks the poisons and a keep share drops it; scored against the pairs with
    the nearest captions (``relative_to: caption``), the poisons rank first and kind 2 stays."""
    g = torch.Generator().manual_seed(0)
    kinds = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    src = torch.arange(300) % 3
    text = kinds[src] + 0.05 * torch.randn(300, 16, generator=g)
    image = kinds[src] + torch.where(src == 2, 1.2, 0.1)[:, None] * torch.randn(300, 16, generator=g)
    poison = torch.zeros(300, dtype=torch.bool)
    poison[[i for i in range(300) if i % 3 == 1][:10]] = True
    text[poison] = kinds[0] + 0.05 * torch.randn(10, 16, generator=g)
    image[poison] = kinds[1] + 0.5 * kinds[0] + 0.1 * torch.randn(10, 16, generator=g)
    labels, hard = poison.numpy(), (src == 2).numpy() & ~poison.numpy()
    plain = build("similarity").scores(PairFeatures(image, text))
    relative = build("similarity", {"relative_to": "caption", "caption_k": 32}).scores(PairFeatures(image, text))
    assert auroc(plain, labels) < 0.8 and auroc(relative, labels) > 0.95
    assert fraction_keep(plain, 0.8).mask[hard].mean() < 0.5
    assert fraction_keep(relative, 0.8).mask[hard].mean() > 0.6
    with pytest.raises(ConfigError, match="relative_to"):
        build("similarity", {"relative_to": "class"})
    with pytest.raises(ConfigError, match="caption_k = 400"):
        build("similarity", {"relative_to": "caption", "caption_k": 400}).scores(PairFeatures(image, text))


def test_pattern_finds_poisons_that_share_an_added_pattern_where_its_suspects_come_from():
    """Five caption classes of smooth random images; 40 poisons captioned as class 0 are images of
    other classes with one noise pattern blended in. Their embeddings are their true classes' with
    the caption checks half-blind (a noisy suspicion score that ranks them only a little higher):
    the pattern estimated from the suspects of each caption group finds them all, and the
    suspects' own images are left out of the estimate they are scored on."""
    from clipguard.data.signatures import pixel_residuals
    from clipguard.detection.detectors.pattern import pattern_scores

    g = torch.Generator().manual_seed(5)
    n, poisons = 440, 40
    cls = torch.arange(n) % 5
    smooth = torch.nn.functional.interpolate(torch.rand(n, 1, 7, 7, generator=g), size=28, mode="bilinear")
    images = smooth + 0.3 * cls.view(-1, 1, 1, 1) / 5
    pattern = torch.rand(1, 1, 28, 28, generator=g)
    images[400:] = 0.8 * images[400:] + 0.2 * pattern
    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    caption_cls = cls.clone()
    caption_cls[400:] = 0
    centres = torch.randn(5, DIM, generator=g) * 3
    text = centres[caption_cls] + 0.1 * torch.randn(n, DIM, generator=g)
    labels = np.r_[np.zeros(400, dtype=bool), np.ones(poisons, dtype=bool)]
    suspicion = labels * 0.5 + np.random.default_rng(0).normal(size=n)
    assert 0.55 < auroc(suspicion, labels) < 0.8
    res = pixel_residuals(u8)
    assert res.shape == (n, 28 * 28)
    groups = caption_cls.numpy()
    scores = pattern_scores(res, groups, suspicion, 0.2, 20)
    assert auroc(scores, labels) > 0.99
    # the same through the registered detector, on features carrying the residuals
    feats = PairFeatures(torch.randn(n, DIM, generator=g), text, residuals=res)
    det = build("pattern", {"suspects_from": "similarity", "clusters": 5, "suspect_share": 0.2, "estimate": "mean"})
    assert det.needs_residuals and not det.needs_reference
    out = det.score(feats)
    assert out.shape == (n,) and np.isfinite(out).all()
    # combine: max keeps what the suspects' detector ranks high (each score a rank share)
    both = build("pattern", {"suspects_from": "similarity", "clusters": 5, "suspect_share": 0.2, "estimate": "mean",
                             "combine": "max"}).score(feats)
    from clipguard.detection.runner import rank_shares

    sim = build("similarity").score(feats)
    assert np.allclose(both, np.maximum(rank_shares(out), rank_shares(sim)))
    # a group too small to estimate scores 0; no residuals is a clear error
    assert not pattern_scores(res, groups, suspicion, 0.2, 1000).any()
    with pytest.raises(ConfigError, match="high-passed pixels"):
        det.score(PairFeatures(torch.randn(n, DIM), text))
    with pytest.raises(ConfigError, match="suspects_from"):
        build("pattern", {"suspects_from": "pattern"})
    with pytest.raises(ConfigError, match="suspect_share"):
        build("pattern", {"suspect_share": 1.0})
    assert build("pattern", {"suspects_from": "shift"}).needs_reference
    assert build("pattern", {"suspects_from": "shift", "suspects_options": "baseline=reference, k=8"}
                 ).suspects.opt.baseline == "reference"
    with pytest.raises(ConfigError, match="key=value"):
        build("pattern", {"suspects_options": "k"})
    with pytest.raises(ConfigError, match="suspects_options"):
        build("pattern", {"suspects_from": "shift", "suspects_options": "baseline=sideways"})


def test_a_whitened_pattern_finds_a_faint_trigger_under_textured_content():
    """Images whose high frequencies vary along a few strong directions (textures), and poisons
    with a faint noise pattern: the plain mean direction is swamped by the texture, the whitened
    one (shrunk inverse covariance) is not; its z-score is measured against the non-suspects."""
    from clipguard.detection.detectors.pattern import pattern_scores, shrunk_precision

    g = torch.Generator().manual_seed(6)
    n, d, poisons = 1200, 64, 120
    textures = torch.randn(4, d, generator=g) * 3
    res = torch.randn(n, 4, generator=g) @ textures + 0.3 * torch.randn(n, d, generator=g)
    res[-poisons:] += 0.25 * torch.randn(d, generator=g)
    labels = np.r_[np.zeros(n - poisons, dtype=bool), np.ones(poisons, dtype=bool)]
    groups = np.zeros(n, dtype=np.int64)
    suspicion = labels * 1.0 + np.random.default_rng(1).normal(size=n)
    plain = pattern_scores(res, groups, suspicion, 0.2, 20)
    whitened = pattern_scores(res, groups, suspicion, 0.2, 20, shrunk_precision(res))
    assert auroc(whitened, labels) > 0.99 > auroc(plain, labels)
    with pytest.raises(ConfigError, match="estimate"):
        build("pattern", {"estimate": "median"})


@pytest.mark.filterwarnings("ignore:Only one sample")
@pytest.mark.parametrize("n,p", [(500, 40), (30, 60), (200, 1), (1, 5), (4000, 784)])
def test_ledoit_wolf_covariance_is_sklearns(n: int, p: int):
    """The one-product Ledoit-Wolf estimate matches scikit-learn's three-product one to rounding,
    whether samples outnumber features or not (and the degenerate shapes sklearn accepts)."""
    from sklearn.covariance import ledoit_wolf

    from clipguard.detection.detectors.pattern import ledoit_wolf_covariance

    g = torch.Generator().manual_seed(n + p)
    x = torch.randn(n, p, generator=g) * torch.linspace(0.1, 3.0, p) + torch.randn(p, generator=g)
    want, _ = ledoit_wolf(x.double().numpy())
    got = ledoit_wolf_covariance(x).numpy()
    assert got.shape == (p, p) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
