"""``repeat``: how close a pair's image is to its k-th nearest other image (minus the log
distance); near-identical copies of one image score highest.

Targeted poisoning (TDPA) repeats each target image under many captions of the adversarial
class, and nothing in a clean dataset sits as close to k other images as those copies sit to
each other (an exact copy's distance is 0). The density detectors look the other way: to them a
group of copies is the densest, most normal neighbourhood there is. An attacker who adds noise
to every copy evades it (docs/threat-model.md measures how much noise it takes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from clipguard.detection.base import DETECTORS
from clipguard.detection.density import EPS, DensityDetector, DensityOptions


@dataclass
class RepeatOptions(DensityOptions):
    """``k``: how many copies make an image suspicious (it must have k near-identical others)."""

    kind: ClassVar[str] = "detector 'repeat'"
    k: int = 4


@DETECTORS.register("repeat")
class RepeatDetector(DensityDetector):
    name = "repeat"
    summary = "minus the log distance to the k-th nearest image (near-identical copies are suspicious)"
    options_class = RepeatOptions

    def local_score(self, distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return -distances[:, -1].clamp_min(EPS).log()
