"""A tiny synthetic labelled image-caption dataset for the attack tests (seconds, no downloads),
and an in-memory poisoning context, set-up attacks and pixels for the trigger tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipguard import attacks
from clipguard.attacks.base import PoisonContext
from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import ImageCaptionData, write_csv

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


def ctx_for(h: int = 28, w: int = 28, n: int = 4, seed: int = 0) -> PoisonContext:
    g = torch.Generator().manual_seed(123)
    data = ImageCaptionData(images=torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8),
                            captions=[f"c{i}" for i in range(n)], labels=torch.zeros(n, dtype=torch.long),
                            paths=[f"{i}.png" for i in range(n)])
    return PoisonContext(data=data, target=1, seed=seed, trigger_seed=seed)


def setup(name: str, ctx: PoisonContext | None = None, **opts):
    a = attacks.build(name, opts)
    a.setup(ctx or ctx_for())
    return a


def pixels(n: int = 3, h: int = 28, w: int = 28, seed: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
