"""The embedded default dataset: Debian's Fashion-MNIST turned into an open_clip-style CSV.

Captions are seeded and varied (templates x synonyms x adjectives) so the text tower has to
learn something, like web captions; the CSV then flows through the same loader as any dataset.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import DEFAULT_SEPARATOR, write_csv
from clipguard.errors import ConfigError, DataError, OutputError
from clipguard.io import TMP_SUFFIX, _umask, write_json

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


STAMP = ".clipguard-data.json"
_OUR_PNG = re.compile(r"^(train|test)/\d{5}\.png$")


def materialise_args(train_size: int | None, test_size: int | None, seed: int) -> dict[str, Any]:
    """What a folder was made with (recorded in its stamp, compared by ``clipguard data``)."""
    return {"dataset": "fashion-mnist", "train_size": train_size, "test_size": test_size, "seed": seed}


def read_stamp(out: str | Path) -> dict[str, Any] | None:
    """The stamp an earlier ``materialise`` left in ``out``; None if there is none (or it is broken)."""
    try:
        obj = json.loads((Path(out) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("files"), list) else None


def materialise(out: str | Path, *, train_size: int | None = None, test_size: int | None = None,
                seed: int = 0, root: Path = DEBIAN_DIR, overwrite: bool = False) -> Path:
    """Write ``out/{train,test}.csv``, PNG images and ``classes.json``.

    Everything is built in a temporary sibling folder first. A missing or empty ``out`` is then
    renamed into place (atomic as a whole); otherwise the files are moved in one by one (each move
    atomic; PNGs before the CSVs that name them, and a PNG's name is its source index, so a CSV
    never names a missing or different image). Files are only ever deleted if the stamp of an
    earlier run lists them: a non-empty folder without our stamp is refused unless ``overwrite``,
    and even then only the files we write are replaced.
    """
    for name, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and int(size) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {size}")
    out = Path(out)
    previous = _previous_files(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent))
    try:
        files = _build(tmp, train_size, test_size, seed, root)
        write_json(tmp / STAMP, {**materialise_args(train_size, test_size, seed), "files": files})
        new = set(files)
        _install(tmp, out, files, [f for f in previous if f not in new])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _previous_files(out: Path, overwrite: bool) -> list[str]:
    """Files an earlier run wrote into ``out`` (may be deleted); refuses a foreign folder."""
    if out.exists() and not out.is_dir():
        raise OutputError("it is an existing file; expected a folder", path=str(out))
    if not out.is_dir() or not any(out.iterdir()):
        return []
    stamp = read_stamp(out)
    if stamp is None and not overwrite:
        raise ConfigError(f"{out} is not empty and holds no earlier Fashion-MNIST output; choose another "
                          "--out, or pass --overwrite to write into it (its other files are kept)")
    return [f for f in (stamp or {}).get("files", []) if isinstance(f, str) and _OUR_PNG.match(f)]


def _build(tmp: Path, train_size: int | None, test_size: int | None, seed: int, root: Path) -> list[str]:
    """Write everything into ``tmp``; return the relative paths, PNGs first."""
    pngs: list[str] = []
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
            pngs.append(rel)
            rows.append({"filepath": rel, "title": make_caption(int(labels[i]), rng),
                         "label": str(int(labels[i]))})
        write_csv(tmp / f"{split}.csv", rows, ["filepath", "title", "label"], DEFAULT_SEPARATOR)
    class_info().save(tmp / "classes.json")
    return pngs + ["classes.json", "train.csv", "test.csv"]


def _install(tmp: Path, out: Path, files: list[str], stale: list[str]) -> None:
    if not out.is_dir() or not any(out.iterdir()):
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        os.replace(tmp, out)
        return
    (out / STAMP).unlink(missing_ok=True)  # until the new one lands, the folder is not "up to date"
    for rel in files + [STAMP]:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp / rel, dst)
        except OSError as e:
            raise OutputError(e.strerror or str(e), path=str(dst)) from None
    for rel in stale:
        (out / rel).unlink(missing_ok=True)
