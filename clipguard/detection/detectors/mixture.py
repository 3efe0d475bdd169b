"""``mixture``: SafeCLIP's split, 1 - p_clean of a two-component Gaussian mixture on the pair
similarities (p_clean: posterior of the component with the higher mean).

Its keep rule is the mixture's own split: keep the pairs with p_clean > threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from clipguard.detection.base import (
    DETECTORS,
    Detector,
    DetectorOptions,
    KeepDecision,
    PairFeatures,
    finite_scores,
)
from clipguard.errors import ConfigError
from clipguard.options import require


@dataclass
class MixtureOptions(DetectorOptions):
    kind: ClassVar[str] = "detector 'mixture'"
    threshold: float = 0.5   # keep pairs with p_clean > threshold (0.5: the more likely component)
    seed: int = 0            # of the mixture's initialisation and subsample
    max_points: int = 200_000  # the mixture is fitted on a seeded subsample of at most this many

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.threshold < 1.0, f"option 'threshold' must be in [0, 1), got {self.threshold}")
        require(self.max_points >= 2, f"option 'max_points' must be >= 2, got {self.max_points}")


@DETECTORS.register("mixture")
class MixtureDetector(Detector):
    name = "mixture"
    summary = "1 - p_clean of a 2-component Gaussian mixture on pair similarity (SafeCLIP's split)"
    options_class = MixtureOptions

    def score(self, features: PairFeatures) -> np.ndarray:
        from clipguard.defenses.split import fit_gmm

        if len(features) < 2:
            raise ConfigError("detector 'mixture' needs at least 2 pairs")
        p_clean, fit = fit_gmm(features.similarity, seed=self.opt.seed, max_points=self.opt.max_points)
        self.fit = fit.as_dict()
        return finite_scores(1.0 - p_clean.double(), fill=1.0)

    def keep_rule(self, scores: np.ndarray) -> KeepDecision:
        p_clean = 1.0 - np.asarray(scores, dtype=np.float64)
        rule = {"rule": "mixture", "threshold": self.opt.threshold, **getattr(self, "fit", {})}
        return KeepDecision(p_clean > self.opt.threshold, rule)
