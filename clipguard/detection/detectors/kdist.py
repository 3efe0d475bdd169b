"""``kdist``: distance to the k-th nearest other pair; poisons sit in sparse neighbourhoods."""

from __future__ import annotations

import torch

from clipguard.detection.base import DETECTORS
from clipguard.detection.density import DensityDetector


@DETECTORS.register("kdist")
class KDistDetector(DensityDetector):
    name = "kdist"
    summary = "distance to the k-th nearest neighbour (sparse neighbourhoods are suspicious)"

    def local_score(self, distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return distances[:, -1]
