"""The embedded default dataset: Debian's Fashion-MNIST turned into an open_clip-style CSV.

Captions are seeded and varied (templates x synonyms x adjectives) so the text tower has to
learn something, like web captions; the CSV then flows through the same loader as any dataset.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
from PIL import Image

from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import DEFAULT_SEPARATOR, write_csv
from clipguard.errors import DataError
from clipguard.io import atomic_dir

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


def read_idx(path: Path, offset: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)
    except FileNotFoundError:
        raise DataError(
            "Fashion-MNIST not found; install the Debian package dataset-fashion-mnist "
            "(`make setup` does it)", file=str(path)) from None


def load_split(split: str, root: Path = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return images, labels


def make_caption(label: int, rng: random.Random) -> str:
    noun = rng.choice(SYNONYMS[CLASSES[label]])
    adj = rng.choice(ADJECTIVES)
    phrase = f"{adj} {noun}" if adj else noun
    text = rng.choice(CAPTION_TEMPLATES).format(phrase)
    if text.startswith("a ") and phrase[0] in "aeiou":
        text = "an " + text[2:]
    return text


def class_info() -> ClassInfo:
    return ClassInfo(classes=list(CLASSES), synonyms={c: list(s) for c, s in SYNONYMS.items()})


def _stratified(labels: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    order = rng.permutation(len(labels))
    classes = np.unique(labels)
    per = {c: order[labels[order] == c] for c in classes}
    take, k = [], 0
    while len(take) < n:  # round-robin over classes keeps the split balanced
        c = classes[k % len(classes)]
        j = k // len(classes)
        if j < len(per[c]):
            take.append(per[c][j])
        k += 1
    return np.sort(np.array(take))


def materialise(out: str | Path, *, train_size: int | None = None, test_size: int | None = None,
                seed: int = 0, root: Path = DEBIAN_DIR) -> Path:
    """Write ``out/{train,test}.csv``, PNG images and ``classes.json``; atomic as a whole."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        for split, size in (("train", train_size), ("test", test_size)):
            images, labels = load_split(split, root)
            rng_np = np.random.default_rng([seed, 0 if split == "train" else 1])
            keep = _stratified(labels, size, rng_np)
            rng = random.Random(f"{seed}-{split}")
            (tmp / split).mkdir()
            rows = []
            for i in keep:
                rel = f"{split}/{i:05d}.png"
                Image.fromarray(images[i], mode="L").save(tmp / rel, optimize=False)
                rows.append({"filepath": rel, "title": make_caption(int(labels[i]), rng),
                             "label": str(int(labels[i]))})
            write_csv(tmp / f"{split}.csv", rows, ["filepath", "title", "label"], DEFAULT_SEPARATOR)
        class_info().save(tmp / "classes.json")
    return out
