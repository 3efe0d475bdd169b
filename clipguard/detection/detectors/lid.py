"""``lid``: maximum-likelihood local intrinsic dimensionality of each pair's neighbourhood."""

from __future__ import annotations

import torch

from clipguard.detection.base import DETECTORS
from clipguard.detection.density import DensityDetector, lid_mle


@DETECTORS.register("lid")
class LidDetector(DensityDetector):
    name = "lid"
    summary = "local intrinsic dimensionality, maximum-likelihood estimate (high is suspicious)"

    def local_score(self, distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return lid_mle(distances)
