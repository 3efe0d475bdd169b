"""Built-in datasets: a labelled idx image set turned into an open_clip-style CSV.

Each one (Fashion-MNIST, MNIST) is a ``BuiltinDataset``: its classes, the words its captions use,
and where its four idx files live. Captions are seeded and varied (templates x synonyms x
adjectives) so the text tower has to learn something, like web captions; the CSV then flows
through the same loader as any dataset. A second built-in lets a default chosen on one dataset be
measured on another that nothing was chosen on.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from clipguard.data.classes import DEFAULT_ZEROSHOT_TEMPLATES, ClassInfo
from clipguard.data.csv_dataset import DEFAULT_SEPARATOR, write_csv
from clipguard.errors import ConfigError, DataError, OutputError
from clipguard.io import TMP_SUFFIX, _umask, write_json
from clipguard.registry import Registry

STAMP = ".clipguard-data.json"
_OUR_PNG = re.compile(r"^(train|test)/\d{5}\.png$")


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in dataset: 28x28 grey idx files (``train-images-idx3-ubyte[.gz]`` and the rest),
    class names, and the words of its captions. The class name comes first in each synonym list:
    zero-shot prompts use it, and a name no caption ever used would be a token never trained."""

    name: str                       # as in `clipguard data NAME` and a grid's `builtin: NAME`
    title: str                      # for messages
    classes: list[str]
    synonyms: dict[str, list[str]]
    adjectives: list[str]
    templates: list[str]            # caption templates, one "{}" for the (adjective +) noun
    root: Callable[[], Path]        # where the idx files are when no root is given
    missing: str                    # how to get the files, for the error when they are absent
    summary: str = ""               # one line for `clipguard data --help`
    zeroshot_templates: list[str] = field(default_factory=lambda: list(DEFAULT_ZEROSHOT_TEMPLATES))
    # "noun": "a" before the phrase becomes "an" when the phrase starts with a vowel sound.
    # "first": Fashion-MNIST's historical rule (the caption's first "a", whatever follows it),
    # kept so that its data, and every figure measured on it, stay as they were
    article: str = "noun"
    fetch: Callable[..., Path] | None = None  # fetch(root) puts the files in root (or the default)

    def class_info(self) -> ClassInfo:
        return ClassInfo(classes=list(self.classes), templates=list(self.zeroshot_templates),
                         synonyms={c: list(s) for c, s in self.synonyms.items()})

    def caption(self, label: int, rng: random.Random) -> str:
        noun = rng.choice(self.synonyms[self.classes[label]])
        adj = rng.choice(self.adjectives)
        phrase = f"{adj} {noun}" if adj else noun
        template = rng.choice(self.templates)
        if self.article == "first":
            text = template.format(phrase)
            return "an " + text[2:] if text.startswith("a ") and phrase[0] in "aeiou" else text
        if phrase[0] in "aeiou8" or phrase.startswith(("11", "18")):
            template = re.sub(r"(^|\s)([aA]) \{\}", r"\1\2n {}", template)
        return template.format(phrase)


# each module registers one dataset; they live in clipguard.data beside the readers, so the
# registry names them instead of importing the whole package
BUILTINS: Registry[BuiltinDataset] = Registry(
    "built-in dataset", modules=("clipguard.data.fashion_mnist", "clipguard.data.mnist"))


def get(name: str) -> BuiltinDataset:
    return BUILTINS.get(name)


def names() -> list[str]:
    return BUILTINS.names()


def register(ds: BuiltinDataset) -> BuiltinDataset:
    return BUILTINS.register(ds.name)(ds)


# ---------------------------------------------------------------------------- reading
def read_idx(path: Path, offset: int, ds: BuiltinDataset) -> np.ndarray:
    """One idx file, gzipped (``path``) or not (``path`` without ``.gz``)."""
    plain = path.with_suffix("") if path.suffix == ".gz" else path
    for p, opener in ((path, gzip.open), (plain, open)):
        if p.is_file():
            try:
                with opener(p, "rb") as f:
                    return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"unreadable {ds.title} idx file ({e})", file=str(p)) from None
    raise DataError(f"{ds.title} not found: {ds.missing}", file=f"{plain}[.gz]")


def load_split(ds: BuiltinDataset, split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    root = Path(root) if root is not None else ds.root()
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16, ds)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8, ds).astype(np.int64)
    if images.size != 28 * 28 * len(labels):
        raise DataError(f"{ds.title}: {images.size} image bytes for {len(labels)} labels (expected 28x28 "
                        f"each)", file=str(root / f"{prefix}-images-idx3-ubyte"))
    if len(labels) and int(labels.max()) >= len(ds.classes):
        raise DataError(f"{ds.title}: label {int(labels.max())} out of range for {len(ds.classes)} classes",
                        file=str(root / f"{prefix}-labels-idx1-ubyte"))
    return images.reshape(-1, 28, 28), labels


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


# ---------------------------------------------------------------------------- writing
def materialise_args(ds: BuiltinDataset, train_size: int | None, test_size: int | None,
                     seed: int) -> dict[str, Any]:
    """What a folder was made with (recorded in its stamp, compared by ``clipguard data``)."""
    return {"dataset": ds.name, "train_size": train_size, "test_size": test_size, "seed": seed}


def read_stamp(out: str | Path) -> dict[str, Any] | None:
    """The stamp an earlier ``materialise`` left in ``out``; None if there is none (or it is broken)."""
    try:
        obj = json.loads((Path(out) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("files"), list) else None


def materialise(ds: BuiltinDataset, out: str | Path, *, train_size: int | None = None,
                test_size: int | None = None, seed: int = 0, root: Path | None = None,
                overwrite: bool = False) -> Path:
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
        files = _build(ds, tmp, train_size, test_size, seed, root)
        write_json(tmp / STAMP, {**materialise_args(ds, train_size, test_size, seed), "files": files})
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
        raise ConfigError(f"{out} is not empty and holds no earlier built-in dataset; choose another "
                          "--out, or pass --overwrite to write into it (its other files are kept)")
    return [f for f in (stamp or {}).get("files", []) if isinstance(f, str) and _OUR_PNG.match(f)]


def _build(ds: BuiltinDataset, tmp: Path, train_size: int | None, test_size: int | None, seed: int,
           root: Path | None) -> list[str]:
    """Write everything into ``tmp``; return the relative paths, PNGs first."""
    pngs: list[str] = []
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = load_split(ds, split, root)
        rng_np = np.random.default_rng([seed, 0 if split == "train" else 1])
        keep = _stratified(labels, size, rng_np)
        rng = random.Random(f"{seed}-{split}")
        (tmp / split).mkdir()
        rows = []
        for i in keep:
            rel = f"{split}/{i:05d}.png"
            Image.fromarray(images[i], mode="L").save(tmp / rel, optimize=False)
            pngs.append(rel)
            rows.append({"filepath": rel, "title": ds.caption(int(labels[i]), rng),
                         "label": str(int(labels[i]))})
        write_csv(tmp / f"{split}.csv", rows, ["filepath", "title", "label"], DEFAULT_SEPARATOR)
    ds.class_info().save(tmp / "classes.json")
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
