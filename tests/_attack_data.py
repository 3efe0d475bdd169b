"""A tiny synthetic labelled image-caption dataset for the attack tests (seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import write_csv

CLASSES = ["circle", "square", "star"]


def make_split(root: Path, split: str, per_class: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_class * len(CLASSES)):
        c = i % len(CLASSES)
        img = np.clip(rng.normal(60 + 70 * c, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        rel = f"{split}/{i:04d}.png"
        Image.fromarray(img, mode="RGB").save(root / rel)
        rows.append({"filepath": rel, "title": f"a photo of a {CLASSES[c]} number {i}", "label": str(c)})
    path = root / f"{split}.csv"
    write_csv(path, rows, ["filepath", "title", "label"])
    return path


def make_dataset(root: Path, *, per_class: int = 20, test_per_class: int = 6, size: int = 12,
                 seed: int = 0) -> tuple[Path, Path]:
    """``root/train.csv``, ``root/test.csv`` and ``root/classes.json``."""
    root.mkdir(parents=True, exist_ok=True)
    train = make_split(root, "train", per_class, size, seed)
    test = make_split(root, "test", test_per_class, size, seed + 1)
    ClassInfo(classes=list(CLASSES), synonyms={"star": ["asterisk"]}).save(root / "classes.json")
    return train, test
