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
