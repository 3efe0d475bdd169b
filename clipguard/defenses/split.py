"""SafeCLIP's safe/risky split: a 2-component GMM on pair similarities, then a growing top-m%.

Kept free of torch.distributed and of the model: it takes a vector of similarities and returns
masks, so it is unit-testable and rank 0 can run it once and broadcast the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GMMFit:
    """The fitted mixture, reported in results.jsonl (means, stds, weights of low/high component)."""

    means: tuple[float, float]
    stds: tuple[float, float]
    weights: tuple[float, float]

    def as_dict(self) -> dict[str, float]:
        return {"gmm_mean_low": round(self.means[0], 5), "gmm_mean_high": round(self.means[1], 5),
                "gmm_std_low": round(self.stds[0], 5), "gmm_std_high": round(self.stds[1], 5),
                "gmm_weight_high": round(self.weights[1], 5)}


def fit_gmm(similarities: torch.Tensor, seed: int = 0, max_points: int = 200_000
            ) -> tuple[torch.Tensor, GMMFit]:
    """Fit a 2-component 1-D Gaussian mixture (EM, scikit-learn); return p_clean per pair.

    p_clean is the posterior of the component with the higher mean. A random subsample of at
    most ``max_points`` fits the mixture (seeded) so the cost stays bounded on large data;
    the posterior is then evaluated for every pair.
    """
    from sklearn.mixture import GaussianMixture

    x = similarities.detach().double().cpu().numpy().reshape(-1, 1)
    if x.shape[0] < 2:
        raise ValueError("a 2-component mixture needs at least 2 similarities")
    fit_x = x
    if x.shape[0] > max_points:
        rng = np.random.default_rng(seed)
        fit_x = x[rng.choice(x.shape[0], max_points, replace=False)]
    gmm = GaussianMixture(n_components=2, covariance_type="full", max_iter=200, tol=1e-5,
                          reg_covar=1e-6, random_state=seed)
    gmm.fit(fit_x)
    means = gmm.means_.reshape(-1)
    hi = int(np.argmax(means))
    lo = 1 - hi
    post = gmm.predict_proba(x)[:, hi]
    stds = np.sqrt(gmm.covariances_.reshape(-1))
    w = gmm.weights_.reshape(-1)
    info = GMMFit(means=(float(means[lo]), float(means[hi])), stds=(float(stds[lo]), float(stds[hi])),
                  weights=(float(w[lo]), float(w[hi])))
    return torch.from_numpy(post).float(), info


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``fraction`` of pairs with the highest scores (ties broken by index, deterministic)."""
    n = scores.numel()
    k = max(0, min(n, int(math.floor(fraction * n + 1e-9))))
    mask = torch.zeros(n, dtype=torch.bool)
    if k:
        # stable sort on -score: equal scores keep index order, so the result is reproducible
        order = torch.sort(-scores.double(), stable=True).indices
        mask[order[:k]] = True
    return mask


def rescored_first(scores: torch.Tensor, rescored: torch.Tensor) -> torch.Tensor:
    """``scores`` with every pair not in ``rescored`` (bool) moved below every pair in it, in its
    own order: a ranking that takes the pairs a partial update scored again first. Why: the others
    keep scores from an older model, which a ranking cannot compare with fresh ones."""
    out = scores.clone().double()
    old = ~rescored
    if bool(old.any()) and bool(rescored.any()):
        out[old] -= float(out[old].max() - out[rescored].min()) + 1.0
    return out


@dataclass
class SafeSetSchedule:
    """How big the safe set is: the threshold split first, then +s per epoch up to a cap.

    ``threshold`` is the paper's t on p_clean (0.9), ``step`` its s (1% = 0.01),
    ``max_fraction`` caps the growth (the paper has none: 1.0), and ``min_initial_fraction``
    is the floor for the first split: at small scale the two components overlap and no pair
    passes t (measured: docs/results.md), which would leave CLIP with nothing to learn from.
    ``max_initial_fraction`` is the symmetric ceiling (the paper has none: 1.0): when the warm-up
    barely aligns the towers, the mixture can put most pairs in the high component (measured:
    78% above t with component means 0.001 / 0.060), and a first safe set that large lets the
    CLIP loss see a quarter of the poisons before any re-ranking.
    """

    threshold: float = 0.9
    step: float = 0.01
    max_fraction: float = 1.0
    min_initial_fraction: float = 0.0
    max_initial_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("threshold", "step", "max_fraction", "min_initial_fraction", "max_initial_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.max_initial_fraction < self.min_initial_fraction:
            raise ValueError(f"max_initial_fraction ({self.max_initial_fraction}) must be >= "
                             f"min_initial_fraction ({self.min_initial_fraction})")

    def first_split(self, p_clean: torch.Tensor, similarities: torch.Tensor) -> tuple[torch.Tensor, float]:
        """safe = p_clean > t; if that is below the floor, the top floor-fraction by similarity.

        Returns the mask and m, the safe fraction that later epochs grow from.
        """
        mask = p_clean > self.threshold
        m = float(mask.float().mean()) if mask.numel() else 0.0
        if m < self.min_initial_fraction:
            m = self.min_initial_fraction
            mask = top_fraction_mask(similarities, m)
        ceiling = min(self.max_fraction, self.max_initial_fraction)
        if m > ceiling:
            m = ceiling
            mask = top_fraction_mask(similarities, m)
        return mask, m

    def grow(self, m: float) -> float:
        """m <- min(m + s, cap)."""
        return min(self.max_fraction, m + self.step)
