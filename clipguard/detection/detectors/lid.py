"""``lid``: maximum-likelihood local intrinsic dimensionality of each pair's neighbourhood."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from clipguard.detection.base import DETECTORS
from clipguard.detection.density import DensityDetector, DensityOptions, lid_mle


@dataclass
class LidOptions(DensityOptions):
    kind: ClassVar[str] = "detector 'lid'"


@DETECTORS.register("lid")
class LidDetector(DensityDetector):
    name = "lid"
    summary = "local intrinsic dimensionality, maximum-likelihood estimate (high is suspicious)"
    options_class = LidOptions

    def local_score(self, distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return lid_mle(distances)
