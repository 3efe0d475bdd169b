"""``pattern``: the additive pattern a backdoor's poisons share, estimated from the suspects.

Why: a backdoor's poisons carry one trigger added to their images (a patch, a blended image or
noise, a sinusoid) and one target caption. Another detector (``suspects_from``) finds most of them but
misses those whose embedding the trigger moved least, such as Blended poisons made from thin
objects. Here the captions are grouped as ``spectral`` groups them (k-means on the text
embeddings: a backdoor's poisons fall in its target's groups); in each group the images of the
``suspect_share`` of pairs the detector ``suspects_from`` finds most suspicious, high-passed
(``signatures.pixel_residuals``), minus the group's mean high-passed image, average to an estimate
of the group's pattern, and every pair of the group scores its own high-passed image's projection
on it, as a robust z-score within the group (median and MAD), so groups compare. A suspect's own
image is left out of the estimate it is scored on. A group with no pattern gets an estimate of
whatever its suspects share, and scores near 0 after the z-score. By default (``combine: max``) a
pair's score is the larger of its rank shares under this and under the suspects' detector, so
the poisons only that detector sees (no shared pattern) stay ranked as it ranks them.

What it cannot see: poisons with no shared additive pattern (targeted poisoning's clean-looking
copies, WaNet's warping), and patterns finer than the high-passed image keeps (images larger than
``signatures.RESIDUAL_SIDE`` pixels are shrunk first). It reads pixels, so it needs the images, not
only a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from clipguard.detection.base import (
    DETECTORS,
    MAD_TO_STD,
    Detector,
    DetectorOptions,
    PairFeatures,
    finite_scores,
)
from clipguard.detection.detectors.spectral import caption_groups
from clipguard.errors import ConfigError
from clipguard.options import require


@dataclass
class PatternOptions(DetectorOptions):
    kind: ClassVar[str] = "detector 'pattern'"
    # the detector (with its defaults) whose most suspicious pairs estimate each group's pattern
    suspects_from: str = "caption-agreement"
    # that detector's options as "key=value,key=value" (empty: its defaults), e.g. "baseline=reference"
    suspects_options: str = ""
    suspect_share: float = 0.1       # the share of each caption group's pairs taken as its suspects
    clusters: int = 50               # caption groups (k-means on the text embeddings), as spectral's
    min_group: int = 20              # smaller groups score 0
    seed: int = 0                    # k-means seed
    # what a pair scores: "pattern", its projection's z-score alone (blind to poisons with no
    # shared pattern); "max", the larger of its rank share (in (0, 1]) under that score and under
    # the suspects' detector, so the pairs that detector finds stay found
    combine: Literal["pattern", "max"] = "max"
    max_points: int = 200_000        # k-means is fitted on a seeded sample of this many pairs

    def suspects_dict(self) -> dict[str, str]:
        """``suspects_options`` as a mapping (each value converted by that detector's options)."""
        out: dict[str, str] = {}
        for item in filter(None, (x.strip() for x in str(self.suspects_options).split(","))):
            key, sep, value = item.partition("=")
            require(bool(sep) and bool(key.strip()), f"option 'suspects_options': {item!r} is not key=value")
            out[key.strip()] = value.strip()
        return out

    def validate(self) -> None:
        super().validate()
        known = [n for n in DETECTORS.names() if n not in ("pattern", "ensemble")]
        self.suspects_dict()  # well-formed key=value pairs (their values: checked when the detector is built)
        require(self.suspects_from in known, f"option 'suspects_from': unknown detector {self.suspects_from!r}; "
                                             f"choose from: {', '.join(known)}")
        require(0.0 < self.suspect_share < 1.0, f"option 'suspect_share' must be in (0, 1), got {self.suspect_share}")
        require(self.clusters >= 1, f"option 'clusters' must be >= 1, got {self.clusters}")
        require(self.min_group >= 2, f"option 'min_group' must be >= 2, got {self.min_group}")
        require(self.max_points >= 2, f"option 'max_points' must be >= 2, got {self.max_points}")
        require(self.combine in ("pattern", "max"), f"option 'combine' must be 'pattern' or 'max', got {self.combine!r}")


def pattern_scores(residuals: torch.Tensor, groups: np.ndarray, suspicion: np.ndarray, share: float,
                   min_group: int) -> np.ndarray:
    """Per caption group: each row's projection on the group's pattern (its suspects' mean
    high-passed image minus the group's, a suspect's own image left out of its estimate), as a
    robust z-score within the group. Groups smaller than ``min_group`` score 0."""
    out = np.zeros(len(residuals), dtype=np.float64)
    susp = np.asarray(suspicion, dtype=np.float64)
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        if len(idx) < min_group:
            continue
        h = residuals[torch.from_numpy(idx)].double()
        centred = h - h.mean(dim=0)
        k = max(1, math.ceil(share * len(idx)))
        order = np.argsort(-susp[idx], kind="stable")[:k]
        top = torch.from_numpy(order)
        pattern = centred[top].mean(dim=0)
        own = centred @ pattern
        # a suspect's projection on the estimate without its own image: (x . (p - x / k))
        own[top] -= centred[top].pow(2).sum(dim=1) / k
        norm = float(pattern.norm())
        if norm == 0.0:
            continue
        proj = (own / norm).numpy()
        med = float(np.median(proj))
        spread = MAD_TO_STD * float(np.median(np.abs(proj - med)))
        if spread == 0.0:
            spread = float(np.std(proj)) or 1.0
        out[idx] = (proj - med) / spread
    return out


@DETECTORS.register("pattern")
class PatternDetector(Detector):
    name = "pattern"
    summary = "a shared additive image pattern, estimated per caption group from another detector's suspects"
    options_class = PatternOptions
    needs_residuals = True
    in_default_set = False  # it keeps a high-passed copy of every image: run it by name

    def __init__(self, options: PatternOptions | None = None) -> None:
        super().__init__(options)
        from clipguard.detection.base import build

        self.suspects = build(self.opt.suspects_from, self.opt.suspects_dict(),
                              where="detector 'pattern', option 'suspects_options'")
        self.needs_reference = self.suspects.needs_reference

    def searches(self, features: PairFeatures) -> list[tuple[PairFeatures, str, str]]:
        return self.suspects.searches(features)

    def score(self, features: PairFeatures) -> np.ndarray:
        if features.residuals is None:
            raise ConfigError("detector 'pattern' reads the images' high-passed pixels, which these features "
                              "were encoded without (encode_pairs(..., residuals=True))")
        suspicion = self.suspects.scores(features)
        o = self.opt
        groups = caption_groups(features.text.numpy(), o.clusters, o.seed, o.max_points)
        own = finite_scores(pattern_scores(features.residuals, groups, suspicion, o.suspect_share, o.min_group))
        if o.combine == "pattern":
            return own
        from clipguard.detection.runner import rank_shares

        return finite_scores(np.maximum(rank_shares(own), rank_shares(suspicion)))
