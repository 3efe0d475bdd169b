"""``slof``: simplified local outlier factor, the pair's k-distance relative to its neighbours'."""

from __future__ import annotations

import torch

from clipguard.detection.base import DETECTORS
from clipguard.detection.density import EPS, DensityDetector


@DETECTORS.register("slof")
class SlofDetector(DensityDetector):
    name = "slof"
    summary = "simplified LOF: mean over neighbours o of d_k(x) / d_k(o)"

    def local_score(self, distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        dk = distances[:, -1].clamp_min(EPS)
        return (dk.unsqueeze(1) / dk[indices]).mean(dim=1)
