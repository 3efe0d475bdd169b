"""The embedded default dataset: Debian's Fashion-MNIST turned into an open_clip-style CSV
(``clipguard.data.builtin`` does the work; this module holds its words and keeps the names
callers import)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from clipguard.data import builtin
from clipguard.data.builtin import read_stamp  # noqa: F401  (part of this module's interface)
from clipguard.data.classes import ClassInfo

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot"]
# The class name itself comes first in every list: zero-shot prompts say "a photo of a {class}.",
# so a class name that no caption ever uses would be a token the text tower never trained.
SYNONYMS = {
    "t-shirt": ["t-shirt", "tee", "top", "tee shirt"],
    "trouser": ["trouser", "trousers", "pants", "slacks", "jeans"],
    "pullover": ["pullover", "sweater", "jumper", "knit sweater"],
    "dress": ["dress", "gown", "frock", "sundress"],
    "coat": ["coat", "jacket", "overcoat", "parka"],
    "sandal": ["sandal", "flip-flop", "strappy sandal", "summer sandal"],
    "shirt": ["shirt", "button-up shirt", "blouse", "dress shirt"],
    "sneaker": ["sneaker", "trainer", "running shoe", "athletic shoe"],
    "bag": ["bag", "handbag", "purse", "tote"],
    "ankle boot": ["ankle boot", "boot", "bootie", "short boot"],
}
ADJECTIVES = ["", "", "", "new", "stylish", "cheap", "old", "casual", "classic", "comfortable",
              "plain", "vintage", "small", "simple"]
CAPTION_TEMPLATES = [
    "a photo of a {}.",
    "a {} on a plain background.",
    "a product photo of a {}.",
    "a low resolution picture of a {}.",
    "my new {}.",
    "a grayscale image of a {} for sale.",
    "a close-up of a {}.",
    "someone is selling a {} online.",
    "look at this {}!",
    "a {} in a shop catalogue.",
    "the {} I bought last week.",
    "a black and white photo of a {}.",
]


FASHION_MNIST = builtin.register(builtin.BuiltinDataset(
    name="fashion-mnist", title="Fashion-MNIST", classes=CLASSES, synonyms=SYNONYMS, adjectives=ADJECTIVES,
    templates=CAPTION_TEMPLATES, root=lambda: DEBIAN_DIR, article="first",
    missing="install the Debian package dataset-fashion-mnist (`make setup` does it)",
    summary="Debian's Fashion-MNIST with seeded, varied captions (the default dataset)"))


def load_split(split: str, root: Path = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    return builtin.load_split(FASHION_MNIST, split, root)


def make_caption(label: int, rng: random.Random) -> str:
    return FASHION_MNIST.caption(label, rng)


def class_info() -> ClassInfo:
    return FASHION_MNIST.class_info()


def materialise_args(train_size: int | None, test_size: int | None, seed: int) -> dict[str, Any]:
    return builtin.materialise_args(FASHION_MNIST, train_size, test_size, seed)


def materialise(out: str | Path, *, train_size: int | None = None, test_size: int | None = None,
                seed: int = 0, root: Path = DEBIAN_DIR, overwrite: bool = False) -> Path:
    """Fashion-MNIST into ``out`` (``clipguard.data.builtin.materialise``)."""
    return builtin.materialise(FASHION_MNIST, out, train_size=train_size, test_size=test_size, seed=seed,
                               root=root, overwrite=overwrite)
