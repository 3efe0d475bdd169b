"""``dao``: dimensionality-aware outlier score, one of the local-density detectors that "Detecting
Backdoor Samples in Contrastive Language Image Pretraining" (ICLR 2025) applies to CLIP's data.

score(x) = mean over o in N_k(x) of LID(o) * log(d_k(x) / d_k(o)): the log-ratio of x's
k-distance to its neighbours', weighted by the neighbours' local intrinsic dimensionality, so a
sparse spot counts more where the data are locally high-dimensional."""

from __future__ import annotations

import torch

from clipguard.detection.base import DETECTORS
from clipguard.detection.density import EPS, DensityDetector, lid_mle


@DETECTORS.register("dao")
class DaoDetector(DensityDetector):
    name = "dao"
    summary = "dimensionality-aware outlier: mean over neighbours o of LID(o) * log(d_k(x) / d_k(o))"

    def local_score(self, distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        dk = distances[:, -1].clamp_min(EPS)
        lid = lid_mle(distances).double()
        return (lid[indices] * torch.log(dk.unsqueeze(1) / dk[indices])).mean(dim=1)
