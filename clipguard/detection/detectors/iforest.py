"""``iforest``: scikit-learn's Isolation Forest on the embeddings (seeded); pairs that random
axis-aligned splits isolate in few steps are suspicious."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from clipguard.detection.base import DETECTORS, Detector, DetectorOptions, PairFeatures, finite_scores
from clipguard.options import require


@dataclass
class IForestOptions(DetectorOptions):
    kind: ClassVar[str] = "detector 'iforest'"
    space: Literal["image", "text", "joint"] = "image"
    n_estimators: int = 100
    max_samples: int = 256   # pairs per tree (scikit-learn's 'auto'), fewer when the data are smaller
    seed: int = 0
    jobs: int = 1            # scikit-learn n_jobs (-1: every core)

    def validate(self) -> None:
        super().validate()
        require(self.n_estimators >= 1, f"option 'n_estimators' must be >= 1, got {self.n_estimators}")
        require(self.max_samples >= 2, f"option 'max_samples' must be >= 2, got {self.max_samples}")
        require(self.jobs == -1 or self.jobs >= 1, f"option 'jobs' must be >= 1 or -1, got {self.jobs}")


@DETECTORS.register("iforest")
class IForestDetector(Detector):
    name = "iforest"
    summary = "Isolation Forest on the embeddings (few random splits isolate an outlier)"
    options_class = IForestOptions

    def score(self, features: PairFeatures) -> np.ndarray:
        from sklearn.ensemble import IsolationForest

        x = features.space(self.opt.space).numpy()
        forest = IsolationForest(n_estimators=self.opt.n_estimators,
                                 max_samples=min(self.opt.max_samples, len(x)),
                                 random_state=self.opt.seed, n_jobs=self.opt.jobs)
        forest.fit(x)
        return finite_scores(-forest.score_samples(x))  # scikit-learn: lower is more abnormal
