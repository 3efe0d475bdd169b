"""Local-density detectors: scores from each pair's k nearest neighbours among the other pairs.

In the embedding space of a CLIP model trained on them, backdoor pairs (a trigger pasted on images
of many classes, one target caption) sit in far sparser neighbourhoods than clean pairs
("Detecting Backdoor Samples in Contrastive Language Image Pretraining", ICLR 2025,
arXiv:2502.01385). With d_k(x) the distance of x to its k-th nearest neighbour and N_k(x) its k
nearest neighbours:

- k-distance: d_k(x)
- LID (maximum likelihood): -1 / mean_i log(d_i(x) / d_k(x)), i = 1..k
- SLOF (simplified local outlier factor): mean over o in N_k(x) of d_k(x) / d_k(o)
- DAO (dimensionality-aware outlier): mean over o in N_k(x) of LID(o) * log(d_k(x) / d_k(o))

Every score comes from one exact neighbour search per (space, metric), shared by the detectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from clipguard.detection.base import Detector, DetectorOptions, PairFeatures, finite_scores
from clipguard.options import require

EPS = 1e-12
MAX_LID = 1e6  # the MLE diverges when the k distances are all equal; capped there


@dataclass
class DensityOptions(DetectorOptions):
    """Neighbourhood size, the embedding searched and its distance."""

    kind: ClassVar[str] = "density detector"
    k: int = 16                                          # neighbours per pair
    # joint: image and text concatenated; pixels: the images' coarse pixel signatures
    # (clipguard.data.signatures), where copies with their own noise stay together
    space: Literal["image", "text", "joint", "pixels"] = "image"
    metric: Literal["l2", "cosine"] = "l2"               # of the L2-normalised embeddings

    def validate(self) -> None:
        super().validate()
        require(self.k >= 2, f"option 'k' must be >= 2, got {self.k}")
        require(self.space != "pixels" or self.metric == "l2",
                "space 'pixels' is searched with metric 'l2' (signatures are not normalised)")


def lid_mle(distances: torch.Tensor) -> torch.Tensor:
    """Maximum-likelihood LID from each row's k nearest-neighbour distances (ascending).

    Zero distances (duplicates) are clamped to a tiny positive value; a row whose distances are
    all equal gets ``MAX_LID``."""
    d = distances.double().clamp_min(EPS)
    logs = torch.log(d / d[:, -1:]).clamp_max(0.0)
    mean = -logs.mean(dim=1)
    return (1.0 / mean.clamp_min(1.0 / MAX_LID)).float()


class DensityDetector(Detector):
    options_class: ClassVar[type[DensityOptions]] = DensityOptions

    def neighbour_key(self) -> tuple[str, str]:
        return self.opt.space, self.opt.metric

    def neighbours(self, features: PairFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices), (N, k) each, nearest first."""
        return features.neighbours(self.opt.space, self.opt.k, self.opt.metric).first(self.opt.k)

    def score(self, features: PairFeatures) -> np.ndarray:
        d, i = self.neighbours(features)
        return finite_scores(self.local_score(d.double(), i))

    def local_score(self, distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
