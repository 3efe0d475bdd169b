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
from typing import ClassVar, Literal

import numpy as np

from clipguard.detection.base import DETECTORS, Detector, DetectorOptions, PairFeatures, finite_scores
from clipguard.options import require


@dataclass
class CaptionAgreementOptions(DetectorOptions):
    kind: ClassVar[str] = "detector 'caption-agreement'"
    k: int = 16                                  # image neighbours whose captions vote
    space: Literal["image", "text", "joint"] = "image"  # where neighbours are found
    metric: Literal["l2", "cosine"] = "l2"

    def validate(self) -> None:
        super().validate()
        require(self.k >= 1, f"option 'k' must be >= 1, got {self.k}")


@DETECTORS.register("caption-agreement")
class CaptionAgreementDetector(Detector):
    name = "caption-agreement"
    summary = "1 - mean cosine of the caption to its image neighbours' captions (a label-noise signal)"
    options_class = CaptionAgreementOptions

    def neighbour_key(self) -> tuple[str, str]:
        return self.opt.space, self.opt.metric

    def score(self, features: PairFeatures) -> np.ndarray:
        _, idx = features.neighbours(self.opt.space, self.opt.k, self.opt.metric).first(self.opt.k)
        text = features.text
        agree = (text[idx] * text.unsqueeze(1)).sum(dim=2).mean(dim=1)  # (N,) mean cosine
        return finite_scores(1.0 - agree.double())
