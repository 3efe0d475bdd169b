"""``spectral``: spectral signatures among pairs with similar captions.

Why: poisons that share a trigger and a target caption form, among the pairs captioned like them,
a direction of their own in the image embedding (Tran et al., NeurIPS 2018, "Spectral Signatures
in Backdoor Attacks"). The density detectors miss such a group once it is large: its members are
each other's nearest neighbours. Here the captions are grouped by k-means on the text embeddings;
in each group the embeddings are centred on the group's median, and a pair scores the squared
length of its projection on the group's top ``components`` principal directions over the group's
median of it, so groups of different spread compare. Without labels the groups stand
in for classes: on captions that fall into few topics (Fashion-MNIST's ten classes) they are the
classes; on web captions they are topics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from clipguard.detection.base import (
    DETECTORS,
    Detector,
    DetectorOptions,
    PairFeatures,
    finite_scores,
)
from clipguard.options import require


@dataclass
class SpectralOptions(DetectorOptions):
    kind: ClassVar[str] = "detector 'spectral'"
    # caption groups (k-means on the text embeddings) and principal directions per group: chosen on
    # validation scans (docs/scan.md#spectral-signatures-chosen-on-validation)
    clusters: int = 50
    components: int = 10
    space: Literal["image", "joint"] = "image"  # the embedding projected within each group
    seed: int = 0             # k-means seed
    max_points: int = 200_000  # k-means is fitted on a seeded sample of this many pairs, then assigns all

    def validate(self) -> None:
        super().validate()
        require(self.clusters >= 1, f"option 'clusters' must be >= 1, got {self.clusters}")
        require(self.components >= 1, f"option 'components' must be >= 1, got {self.components}")
        require(self.space in ("image", "joint"), f"option 'space' must be 'image' or 'joint', got {self.space!r}")
        require(self.max_points >= 2, f"option 'max_points' must be >= 2, got {self.max_points}")


def caption_groups(text: np.ndarray, clusters: int, seed: int, max_points: int) -> np.ndarray:
    """Group index of every pair: k-means on the caption embeddings (fitted on a seeded sample
    when there are more than ``max_points`` pairs; at most one group per distinct caption)."""
    from sklearn.cluster import KMeans

    n = len(text)
    fit = text
    if n > max_points:
        fit = text[np.random.default_rng(seed).choice(n, size=max_points, replace=False)]
    # distinct captions counted on rounded embeddings: one caption encoded in batches of other
    # shapes differs in the last bits, which must not make it two groups
    k = min(clusters, len(np.unique(np.round(fit, 4), axis=0)))
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(fit)
    return km.predict(text).astype(np.int64)


def spectral_scores(x: np.ndarray, groups: np.ndarray, components: int) -> np.ndarray:
    """Per group: the squared length of each row's projection, centred on the group's median, on
    the group's top principal directions, over the group's median of it (so groups of different
    spread compare). Groups of fewer than two rows score 0."""
    out = np.zeros(len(x), dtype=np.float64)
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        if len(idx) < 2:
            continue
        z = torch.from_numpy(x[idx] - np.median(x[idx], axis=0))
        centred = z - z.mean(dim=0)
        _, vecs = torch.linalg.eigh(centred.T @ centred / len(idx))  # ascending eigenvalues
        energy = ((z @ vecs[:, -min(components, vecs.shape[1]):]) ** 2).sum(dim=1).numpy()
        med = float(np.median(energy))
        out[idx] = energy / med if med > 0 else energy
    return out


@DETECTORS.register("spectral")
class SpectralDetector(Detector):
    name = "spectral"
    summary = "spectral signature: squared projection on the top principal directions of the pairs with similar captions"
    options_class = SpectralOptions

    def score(self, features: PairFeatures) -> np.ndarray:
        o = self.opt
        text = features.text.double().numpy()
        x = features.space(o.space).double().numpy()
        ok = np.isfinite(text).all(axis=1) & np.isfinite(x).all(axis=1)
        out = np.full(len(x), np.nan)  # a pair without finite embeddings ranks as most suspicious
        if ok.any():
            groups = caption_groups(text[ok], o.clusters, o.seed, o.max_points)
            out[ok] = spectral_scores(x[ok], groups, o.components)
        return finite_scores(out)
