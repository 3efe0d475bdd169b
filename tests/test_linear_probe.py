"""The linear probe's C: chosen on a validation split (the CLIP protocol) unless given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from clipguard.evaluation.linear_probe import C_GRID, FALLBACK_C, LinearProbe


def imbalanced(seed: int, counts=(60, 10, 10, 10), d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features of separable classes, one of them the majority: a heavily regularised
    probe predicts the majority class everywhere (it underfits); a weakly regularised one is exact."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    x = torch.eye(len(counts), d)[y] * 3 + 0.5 * torch.randn(len(y), d, generator=g)
    return x / x.norm(dim=1, keepdim=True), y


def test_sweep_picks_a_c_that_does_not_underfit():
    x, y = imbalanced(0)
    xt, yt = imbalanced(1)
    tiny = LinearProbe(C=min(C_GRID)).fit(x, y)
    assert tiny.score(xt, yt, (1,))["acc1"] < 0.7  # the smallest C of the grid underfits
    p = LinearProbe(seed=0).fit(x, y)
    assert p.C_source == "validation" and p.chosen_C >= 0.1
    assert p.val_curve[min(C_GRID)] < 0.7 and p.val_accuracy == 1.0
    assert p.n_val == 18  # 20% of 90, stratified
    assert p.score(xt, yt, (1,))["acc1"] == 1.0
    # ties go to the smaller C: the chosen one is the smallest C with the best validation accuracy
    best = max(p.val_curve.values())
    assert p.chosen_C == min(c for c, a in p.val_curve.items() if a == best)
    sel = p.selection()
    assert sel == {"C": p.chosen_C, "C_source": "validation", "val_acc1": 1.0, "n_val": 18}
    assert "validation split" in p.describe()


def test_sweep_refits_on_all_training_features_with_the_chosen_c():
    x, y = imbalanced(0)
    p = LinearProbe(seed=0).fit(x, y)
    same = LinearProbe(C=p.chosen_C, seed=0).fit(x, y)
    assert p.n_train == 90
    np.testing.assert_array_equal(p.clf.coef_, same.clf.coef_)
    np.testing.assert_array_equal(p.clf.intercept_, same.clf.intercept_)


def test_selection_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(120) % 4
    x = torch.eye(4, 16)[y] * 0.4 + torch.randn(120, 16, generator=g)  # overlapping classes
    a, b = LinearProbe(seed=7).fit(x, y), LinearProbe(seed=7).fit(x, y)
    assert a.chosen_C == b.chosen_C and a.val_curve == b.val_curve
    np.testing.assert_array_equal(a.clf.coef_, b.clf.coef_)
    np.testing.assert_array_equal(a.topk(x, 2), b.topk(x, 2))


def test_a_given_c_is_used_as_before():
    x, y = imbalanced(0)
    p = LinearProbe(C=0.5, seed=0).fit(x, y)
    ref = LogisticRegression(C=0.5, max_iter=1000, random_state=0).fit(x.numpy(), y.numpy())
    np.testing.assert_array_equal(p.clf.coef_, ref.coef_)
    np.testing.assert_array_equal(p.clf.intercept_, ref.intercept_)
    assert p.clf.get_params() == ref.get_params()
    assert p.chosen_C == 0.5 and p.val_accuracy is None and p.C_source == "given" and p.val_curve == {}
    assert p.selection() == {"C": 0.5, "C_source": "given"}


def test_too_few_images_for_a_validation_split_fall_back_to_c_1():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = LinearProbe().fit(x, torch.tensor([0, 1]))
    assert p.C_source == "fallback" and p.chosen_C == FALLBACK_C and p.val_accuracy is None
    assert p.score(x, torch.tensor([0, 1]), (1,))["acc1"] == 1.0


def test_a_class_too_small_to_stratify_still_gets_a_sweep():
    x, y = imbalanced(0, counts=(40, 20, 1))  # class 2 has one image: no stratified split
    p = LinearProbe(seed=0).fit(x, y)
    assert p.C_source == "validation" and p.n_val == 13


def test_probe_errors_unchanged():
    from clipguard.errors import DataError

    with pytest.raises(DataError, match="two classes"):
        LinearProbe().fit(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
