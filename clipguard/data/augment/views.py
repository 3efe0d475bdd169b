"""The augmented views every defence draws: SimCLR images and EDA captions, set up once.

SafeCLIP, RoCLIP and CleanCLIP all need "a fresh view of this batch" with their own crop scale
and EDA strength; this is the one place that turns those options into views, so every defence
draws them the same way from the step-seeded generator and rng (exact resume).
"""

from __future__ import annotations

import random

import torch

from clipguard.data.augment.image import simclr_augment
from clipguard.data.augment.text import EDA


class Views:
    """Image and caption views with fixed strengths; the EDA (and its WordNet) loads on first use."""

    def __init__(self, crop_scale_min: float = 0.08, eda_alpha: float = 0.1, eda_p_delete: float = 0.1,
                 blur_p: float = 0.0, flip_p: float = 0.5):
        self.crop_scale_min, self.blur_p, self.flip_p = float(crop_scale_min), float(blur_p), float(flip_p)
        self.eda_alpha, self.eda_p_delete = float(eda_alpha), float(eda_p_delete)
        self._eda: EDA | None = None

    def images(self, pixels: torch.Tensor, generator: torch.Generator, *, geometric_only: bool = False,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """A SimCLR view; ``geometric_only`` keeps the crop and flip and drops colour jitter and grey.
        ``rows``: the views of those samples only, exactly as the full batch's (``simclr_augment``)."""
        extra = {"jitter_p": 0.0, "gray_p": 0.0} if geometric_only else {"blur_p": self.blur_p}
        return simclr_augment(pixels, generator, scale=(self.crop_scale_min, 1.0), flip_p=self.flip_p, rows=rows,
                              **extra)

    def texts(self, captions: list[str], rng: random.Random) -> list[str]:
        """An EDA view of each caption."""
        if self._eda is None:
            self._eda = EDA(alpha=self.eda_alpha, p_delete=self.eda_p_delete)
        return self._eda.augment_batch(captions, rng)
