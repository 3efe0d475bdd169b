"""``caption-agreement``: how little a pair's caption agrees with the captions of its image's
nearest neighbours (1 - mean cosine of the caption embeddings).

A backdoor or targeted poison pairs an image of one kind with a caption of another. In an image
space where the trigger does not dominate (a model trained on a small trusted set, or a unimodal
warm-up model) the poisoned image sits among images of its own kind, whose captions describe
something else: its caption disagrees with its neighbours'. A label-noise signal (as k-NN label
cleaning), not a density one, so it does not care whether poisons sit in dense or sparse regions.
In the poisoned model's own image space the trigger pulls triggered images together under the
target caption, and the signal fades (docs/scan.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from clipguard.detection.base import (
    DETECTORS,
    Detector,
    PairFeatures,
    finite_scores,
    mean_cosine_to_neighbours,
)
from clipguard.detection.density import DensityOptions


@dataclass
class CaptionAgreementOptions(DensityOptions):
    """Neighbours per pair (``k``), the space they are found in and its distance, as the density
    detectors; ``k`` should exceed the copies of one poisoned image."""

    kind: ClassVar[str] = "detector 'caption-agreement'"
    # 64, not the density detectors' 16: chosen on validation (docs/scan.md#which-model-scores),
    # where 20 copies of a TDPA image outvoted their class at k = 16
    k: int = 64


@DETECTORS.register("caption-agreement")
class CaptionAgreementDetector(Detector):
    name = "caption-agreement"
    summary = "1 - mean cosine of the caption to its image neighbours' captions (a label-noise signal)"
    options_class = CaptionAgreementOptions

    def neighbour_key(self) -> tuple[str, str]:
        return self.opt.space, self.opt.metric

    def score(self, features: PairFeatures) -> np.ndarray:
        _, idx = features.neighbours(self.opt.space, self.opt.k, self.opt.metric).first(self.opt.k)
        agree = mean_cosine_to_neighbours(features.text, idx, features.search.chunk)
        return finite_scores(1.0 - agree.double())
