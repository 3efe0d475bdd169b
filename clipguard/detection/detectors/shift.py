"""``shift``: how far the model under scan has moved each pair from the pairs that a reference
model, trained without the suspect data, calls its neighbours.

Why: a backdoor makes the poisoned model map a triggered image by its trigger, and a caption that
does not fit the image pulls the pair towards that caption. A reference model (one trained on a
small trusted set) places the image among images of its own kind. Under the reference, pair i's
k nearest images are found; under the model being scanned, the score is the mean cosine distance
from pair i to those neighbours, in ``space`` (``joint``: image and caption embeddings concatenated
and renormalised). A clean pair stays near the pairs it looks like; a triggered or mislabelled
one has been carried away from them. Neither model alone sees this: the poisoned model finds the
triggered images dense and normal, the reference never saw a trigger. Copies of one image (TDPA)
stay each other's neighbours under both models and score low: pair it with ``repeat``.

``baseline: reference`` subtracts how far the reference itself places pair i from those same
neighbours (its mean cosine distance in ``reference_space``). A pair from a loose class is far from
its neighbours under both models, and that natural spread is not a move the scanned model made;
what is left is the move alone.

Needs the reference model's features (``clipguard scan --reference``, ``PairFeatures.reference``).
``space`` and ``k`` were chosen on validation (docs/scan.md#shift-a-reference-models-neighbours);
``baseline: reference`` ranks the poisons better on validation and test
(docs/scan.md#the-references-own-distance-baseline-reference) but stays off by default: the
detect-then-train recipe built on it did not hold SIG better on the test grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from clipguard.detection.base import (
    DETECTORS,
    Detector,
    DetectorOptions,
    PairFeatures,
    finite_scores,
    mean_cosine_to_neighbours,
)
from clipguard.options import require


@dataclass
class ShiftOptions(DetectorOptions):
    kind: ClassVar[str] = "detector 'shift'"
    k: int = 16                                                  # the reference's neighbours per pair
    space: Literal["image", "text", "joint"] = "joint"           # where the scanned model measures the distance
    reference_space: Literal["image", "text", "joint"] = "image"  # where the reference finds the neighbours
    baseline: Literal["none", "reference"] = "none"              # subtract the reference's own distance to them

    def validate(self) -> None:
        super().validate()
        require(self.k >= 1, f"option 'k' must be >= 1, got {self.k}")


@DETECTORS.register("shift")
class ShiftDetector(Detector):
    name = "shift"
    summary = "distance, under the scanned model, to the pairs a reference model calls the pair's neighbours"
    options_class = ShiftOptions
    needs_reference = True

    def searches(self, features: PairFeatures) -> list[tuple[PairFeatures, str, str]]:
        ref = features.reference
        return [(ref, self.opt.reference_space, "l2")] if ref is not None else []

    def score(self, features: PairFeatures) -> np.ndarray:
        ref = self.reference_of(features)
        k = self.opt.k
        dist, idx = ref.neighbours(self.opt.reference_space, k, "l2").first(k)
        x = features.space(self.opt.space)
        out = 1.0 - mean_cosine_to_neighbours(x, idx, features.search.chunk).double()
        if self.opt.baseline == "reference":
            # the reference's own mean cosine distance to them, from the search's L2 distances
            # between unit vectors: 1 - cos = d^2 / 2
            out -= (dist.double() ** 2 / 2).mean(dim=1)
        return finite_scores(out)
