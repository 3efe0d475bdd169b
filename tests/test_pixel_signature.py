"""benchmarks/pixel_signature.py: a pattern shared by a few rows of a group is their top
direction, and the score finds them without suspects."""

import numpy as np
import torch
from _benchmarks import load_benchmark
from sklearn.metrics import roc_auc_score


def test_a_shared_additive_pattern_is_found_and_noise_is_not():
    mod = load_benchmark("pixel_signature")
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(400, 64, generator=g, dtype=torch.float64)
    pattern = torch.zeros(64, dtype=torch.float64)
    pattern[::7] = 3.0
    rows = clean.clone()
    rows[:40] += pattern  # 10% of the group carry one pattern
    white = mod.whitener(torch.eye(64))
    score, gap = mod.signature_scores(rows, white, components=1)
    truth = np.zeros(400, dtype=bool)
    truth[:40] = True
    assert roc_auc_score(truth, score) > 0.99 and gap > 1.5
    score, gap = mod.signature_scores(clean, white, components=1)  # no pattern: no dominant direction
    assert gap < 1.3
    w = mod.whitener(torch.diag(torch.full((64,), 4.0)))
    assert torch.allclose(w, torch.eye(64, dtype=torch.float64) * 2.0)


def test_groups_are_split_into_parts_of_about_the_asked_size():
    mod = load_benchmark("pixel_signature")
    rng = np.random.default_rng(0)
    rows = np.arange(1000, 2050)
    assert [len(p) for p in mod.groups_of(rows, None, rng)] == [1050]
    assert [len(p) for p in mod.groups_of(rows, 600, rng)] == [1050]  # too few rows for two parts
    parts = mod.groups_of(rows, 200, rng)
    assert len(parts) == 5 and all(205 <= len(p) <= 215 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), rows)
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def test_rows_sharing_one_strong_pattern_are_each_others_nearest_neighbours():
    mod = load_benchmark("pixel_signature")
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(300, 32, generator=g)
    pattern = 4.0 * torch.randn(32, generator=g)
    rows[:20] += pattern
    score = mod.neighbour_scores(rows, torch.eye(32, dtype=torch.float64), k=5, chunk=64)
    truth = np.zeros(300, dtype=bool)
    truth[:20] = True
    assert score.shape == (300,) and roc_auc_score(truth, score) > 0.99
