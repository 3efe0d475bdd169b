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
whatever its suspects share, and scores near 0 after the z-score. By default (``estimate:
whitened``) the mean is whitened by the shrunk inverse covariance of every pair's high-passed
image, so the content's own edges and textures weigh less than a pattern the poisons share.
``combine: max`` scores the larger of a pair's rank shares under this and under the suspects'
detector, so the poisons only that detector sees (no shared pattern) stay ranked as it ranks them.

What it cannot see: poisons with no shared additive pattern (targeted poisoning's clean-looking
copies, WaNet's warping), and patterns finer than the high-passed image keeps (images larger than
``signatures.RESIDUAL_SIDE`` pixels are shrunk first). It reads pixels, so it needs the images, not
only a model, and holds one high-passed copy of each (at most 32 x 32 floats: 4 GB for a million
pairs).
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
    # the detector whose most suspicious pairs estimate each group's pattern
    suspects_from: str = "caption-agreement"
    # that detector's options as "key=value,key=value" (empty: its defaults), e.g. "baseline=reference"
    suspects_options: str = ""
    suspect_share: float = 0.1       # the share of each caption group's pairs taken as its suspects
    clusters: int = 50               # caption groups (k-means on the text embeddings), as spectral's
    min_group: int = 20              # smaller groups score 0
    seed: int = 0                    # k-means seed
    # what a pair scores: "pattern", its projection's z-score alone (blind to poisons with no
    # shared pattern); "max", the larger of its rank share (in (0, 1]) under that score and under
    # the suspects' detector, so the pairs that detector finds stay found (on validation it lowered
    # SIG and WaNet: docs/scan.md#pattern-a-backdoors-shared-image-pattern)
    combine: Literal["pattern", "max"] = "pattern"
    # how each group's pattern is estimated: "mean", the suspects' mean high-passed image, scored
    # within the group by median and MAD; "whitened", that mean whitened by the shrunk inverse
    # covariance of every pair's high-passed image (linear discriminant analysis: the content's
    # own edges and textures weigh less), scored against the group's pairs outside its suspects.
    # The defaults (whitened, combine: pattern) were chosen on validation scans (docs/scan.md)
    estimate: Literal["mean", "whitened"] = "whitened"
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
        require(self.estimate in ("mean", "whitened"),
                f"option 'estimate' must be 'mean' or 'whitened', got {self.estimate!r}")


def shrunk_precision(residuals: torch.Tensor, max_rows: int = 20_000, seed: int = 0) -> torch.Tensor:
    """The inverse of the residuals' covariance, shrunk towards a multiple of the identity by
    Ledoit and Wolf's rule (fitted on a seeded sample of at most ``max_rows`` rows): the
    whitening that turns a pattern's mean into the direction that best tells it from the content's
    own high-frequency variation (edges, textures), as linear discriminant analysis does."""
    x = residuals
    if len(x) > max_rows:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=g)[:max_rows]]
    return torch.linalg.inv(ledoit_wolf_covariance(x))


def ledoit_wolf_covariance(x: torch.Tensor) -> torch.Tensor:
    """(p, p) float64: the covariance of the rows of ``x`` (n, p), shrunk towards mu * I by Ledoit
    and Wolf's rule, as ``sklearn.covariance.ledoit_wolf`` computes it (to rounding).

    Why not sklearn's: it forms three (p, p) products of the data (the covariance once for the
    estimate and twice inside the shrinkage: X'X and (X*X)'(X*X)); the second is the first's
    squared Frobenius norm and the third's sum is sum_n |x_n|^4, so one product is enough. For the
    4,000 pairs and 784 pixels of SafeCLIP's first split that is most of its whitening's cost."""
    x = x.double()
    n, p = x.shape
    x = x - x.mean(dim=0)
    cov = (x.T @ x) / n
    if p < 2:
        return cov  # one feature: nothing to shrink towards (sklearn's shrinkage is 0 there)
    mu = float(torch.diagonal(cov).sum()) / p
    # the shrinkage (Ledoit & Wolf 2004), in sklearn's terms: delta_ the squared coefficients of
    # the covariance, beta_ the sum of (X*X)'(X*X), i.e. of every row's squared norm, squared
    delta_ = float(cov.pow(2).sum())
    beta_ = float(x.pow(2).sum(dim=1).pow(2).sum())
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - p * mu * mu) / p  # sklearn: delta_ - 2 mu trace + p mu^2, trace = p mu
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    out = (1.0 - shrinkage) * cov
    out.diagonal().add_(shrinkage * mu)
    return out


def pattern_scores(residuals: torch.Tensor, groups: np.ndarray, suspicion: np.ndarray, share: float,
                   min_group: int, precision: torch.Tensor | None = None) -> np.ndarray:
    """Per caption group: each row's projection on the group's pattern (its suspects' mean
    high-passed image minus the group's, a suspect's own image left out of its estimate), as a
    robust z-score within the group. Groups smaller than ``min_group`` score 0.

    With ``precision`` (``shrunk_precision``) the pattern is whitened first (projection on
    precision @ pattern, over its length in the covariance's metric), and the z-score's median and
    spread are those of the group's pairs outside its suspects, which a group that is mostly
    poisons cannot pull towards its poisons."""
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
        if precision is None:
            direction = pattern
            own = centred @ direction
            # a suspect's projection on the estimate without its own image: (x . (p - x / k))
            own[top] -= centred[top].pow(2).sum(dim=1) / k
            norm = float(direction.norm())
        else:
            direction = precision @ pattern
            own = centred @ direction
            own[top] -= ((centred[top] @ precision) * centred[top]).sum(dim=1) / k
            norm = math.sqrt(max(0.0, float(pattern @ direction)))
        if norm == 0.0:
            continue
        proj = (own / norm).numpy()
        base = proj
        if precision is not None:
            rest = np.ones(len(idx), dtype=bool)
            rest[order] = False
            base = proj[rest]
        med = float(np.median(base))
        spread = MAD_TO_STD * float(np.median(np.abs(base - med)))
        if spread == 0.0:
            spread = float(np.std(base)) or 1.0
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
        precision = shrunk_precision(features.residuals, seed=o.seed) if o.estimate == "whitened" else None
        own = finite_scores(pattern_scores(features.residuals, groups, suspicion, o.suspect_share, o.min_group,
                                           precision))
        if o.combine == "pattern":
            return own
        from clipguard.detection.runner import rank_shares

        return finite_scores(np.maximum(rank_shares(own), rank_shares(suspicion)))
