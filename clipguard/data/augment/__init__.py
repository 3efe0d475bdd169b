"""Augmentations drawn fresh every step: SimCLR image views and EDA caption views."""

from clipguard.data.augment.image import simclr_augment
from clipguard.data.augment.text import EDA
from clipguard.data.augment.views import Views

__all__ = ["simclr_augment", "EDA", "Views"]
