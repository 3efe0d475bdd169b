"""``similarity``: 1 - cosine similarity of the pair (one minus the CLIP score).

A poisoned caption describes the target class, not the image, so a model that has not learnt
the backdoor scores the pair low. The cheapest detector, and the one that fails once the model
has learnt the poison (a backdoored model aligns the trigger with the target caption)."""

from __future__ import annotations

import numpy as np

from clipguard.detection.base import DETECTORS, Detector, PairFeatures, finite_scores


@DETECTORS.register("similarity")
class SimilarityDetector(Detector):
    name = "similarity"
    summary = "1 - cosine similarity of image and caption (a low CLIP score is suspicious)"

    def score(self, features: PairFeatures) -> np.ndarray:
        return finite_scores(1.0 - features.similarity.double())
