"""Augmentations drawn fresh every step: SimCLR image views, EDA caption views, PAR's noise and
erasing."""

from clipguard.data.augment.image import simclr_augment
from clipguard.data.augment.noise_erase import noise_erase
from clipguard.data.augment.text import EDA
from clipguard.data.augment.views import Views

__all__ = ["simclr_augment", "noise_erase", "EDA", "Views"]
