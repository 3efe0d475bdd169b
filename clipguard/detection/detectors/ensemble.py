"""``ensemble``: several detectors' ranks averaged, each member with its defaults.

Why: the caption checks and the spectral signatures look at different things (whether a caption
fits what images like this one are captioned, and whether a pair lies along a direction its
caption group's other pairs do not), so a clean pair one of them finds odd is seldom odd to
both. Each member's score becomes its rank among all pairs as a share in (0, 1], and the shares
are averaged, so members on different scales weigh the same. The default members were chosen on
validation (docs/scan.md#two-detectors-by-rank-chosen-on-validation). Without ``--keep-fraction``
a pair is kept when every member's own rule keeps it (the members' ``z``; the ensemble's own ``z``
applies only to scores it did not compute itself, and ``relative_to`` to its ranking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from clipguard.detection.base import (
    DETECTORS,
    Detector,
    DetectorOptions,
    KeepDecision,
    PairFeatures,
    finite_scores,
)
from clipguard.options import require


@dataclass
class EnsembleOptions(DetectorOptions):
    kind: ClassVar[str] = "detector 'ensemble'"
    members: str = "caption-agreement,spectral"  # comma-separated detector names, each with its defaults

    def member_names(self) -> list[str]:
        return [m.strip() for m in str(self.members).split(",") if m.strip()]

    def validate(self) -> None:
        super().validate()
        names = self.member_names()
        require(len(names) >= 2, f"option 'members' must name at least two detectors, got {self.members!r}")
        require(len(set(names)) == len(names), f"option 'members' names a detector twice: {self.members!r}")
        known = [n for n in DETECTORS.names() if n != "ensemble"]
        for n in names:
            require(n in known, f"option 'members': unknown detector {n!r}; choose from: {', '.join(known)}")


@DETECTORS.register("ensemble")
class EnsembleDetector(Detector):
    name = "ensemble"
    summary = "mean rank of several detectors (default: caption-agreement and spectral)"
    options_class = EnsembleOptions

    def __init__(self, options: EnsembleOptions | None = None) -> None:
        super().__init__(options)
        from clipguard.detection.base import build

        self.members = [build(n) for n in self.opt.member_names()]
        self.needs_reference = any(m.needs_reference for m in self.members)
        self.needs_residuals = any(m.needs_residuals for m in self.members)
        self._member_scores: list[np.ndarray] | None = None
        self._last: np.ndarray | None = None

    def searches(self, features: PairFeatures) -> list[tuple[PairFeatures, str, str]]:
        """Every member's searches (the reference's among them when ``shift`` is a member)."""
        return [s for m in self.members for s in m.searches(features)]

    def score(self, features: PairFeatures) -> np.ndarray:
        from clipguard.detection.runner import rank_shares

        self._member_scores = [m.scores(features) for m in self.members]
        return finite_scores(np.mean([rank_shares(s) for s in self._member_scores], axis=0))

    def scores(self, features: PairFeatures) -> np.ndarray:
        self._last = super().scores(features)
        return self._last

    def keep_rule(self, scores: np.ndarray) -> KeepDecision:
        """Kept: the pairs every member's own rule keeps, when ``scores`` are those this detector
        computed last (its members' scores are kept beside them); other scores: the robust rule."""
        member = self._member_scores
        if member is None or self._last is None or not np.array_equal(np.asarray(scores), self._last):
            return super().keep_rule(scores)
        decisions = [m.keep_rule(s) for m, s in zip(self.members, member)]
        mask = np.logical_and.reduce([d.mask for d in decisions])
        return KeepDecision(mask, {"rule": "every_member", "members": [
            {"detector": m.name, **d.rule, "kept": d.kept} for m, d in zip(self.members, decisions)]})
