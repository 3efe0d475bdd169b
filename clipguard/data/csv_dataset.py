"""Image-caption data in open_clip's CSV conventions, decoded once and held as tensors.

open_clip reads a CSV (``--csv-img-key filepath --csv-caption-key title --csv-separator '\\t'``)
with image paths relative to the CSV. We read the same files; small datasets are decoded once
into a uint8 tensor so a CPU spends its time training instead of decoding PNGs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clipguard.errors import DataError

DEFAULT_IMG_KEY = "filepath"
DEFAULT_CAPTION_KEY = "title"
DEFAULT_LABEL_KEY = "label"
DEFAULT_SEPARATOR = "\t"


@dataclass
class CsvSpec:
    """How to read a CSV; mirrors open_clip's ``--csv-*`` options."""

    img_key: str = DEFAULT_IMG_KEY
    caption_key: str = DEFAULT_CAPTION_KEY
    label_key: str | None = DEFAULT_LABEL_KEY
    separator: str = DEFAULT_SEPARATOR


@dataclass
class ImageCaptionData:
    """Pairs. ``images`` is uint8 (N, 3, H, W): a tensor, or ``LazyImages`` that decodes on
    indexing (same interface) for data too large for memory. ``labels`` is -1 where unknown."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    paths: list[str]
    source: str = ""
    rows: list[int] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def lazy(self) -> bool:
        return not isinstance(self.images, torch.Tensor)

    def subset(self, idx: Sequence[int] | torch.Tensor) -> "ImageCaptionData":
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        ids = idx_t.tolist()
        return ImageCaptionData(
            images=self.images.select(ids) if self.lazy else self.images[idx_t],
            captions=[self.captions[i] for i in ids],
            labels=self.labels[idx_t], paths=[self.paths[i] for i in ids], source=self.source,
            rows=[self.rows[i] for i in ids] if self.rows else [],
        )


def read_rows(path: str | Path, spec: CsvSpec) -> tuple[list[str], list[dict[str, str]]]:
    """Read header and rows, checking that the columns we need exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=spec.separator)
        header = list(reader.fieldnames or [])
        if not header:
            raise DataError("empty CSV (no header)", file=str(path))
        for key in (spec.img_key, spec.caption_key):
            if key not in header:
                hint = _separator_hint(header, spec.separator)
                raise DataError(
                    f"column '{key}' not in header {header}{hint}", file=str(path), row=1, field=key
                )
        rows = list(reader)
    return header, rows


def _separator_hint(header: list[str], sep: str) -> str:
    if len(header) == 1:
        for cand, name in ((",", "comma"), ("\t", "tab"), (";", "semicolon"), ("|", "pipe")):
            if cand != sep and cand in header[0]:
                return f"; the header looks {name}-separated: pass separator {cand!r} (--csv-separator)"
    return ""


def _decode(path: Path, image_size: int | None) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size, image_size):
            im = _resize_center_crop(im, image_size)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def _decode_checked(img_path: Path, image_size: int | None, csv_path: str, line: int,
                    field: str) -> np.ndarray:
    try:
        return _decode(img_path, image_size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode image {img_path}: {e}", file=csv_path, row=line,
                        field=field) from None


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def load_csv(path: str | Path, spec: CsvSpec | None = None, *, image_size: int | None = None,
             skip_bad_rows: bool = False, limit: int | None = None,
             lazy: bool = False) -> ImageCaptionData:
    """Load and validate every row. Errors name file, row (1 = header) and field.

    ``skip_bad_rows`` drops bad rows instead and reports how many in ``skipped``. ``lazy`` checks
    that every file exists but decodes images only when indexed (needs ``image_size``).
    """
    if lazy and image_size is None:
        raise ValueError("lazy loading needs image_size (every image is resized to it)")
    spec = spec or CsvSpec()
    path = Path(path)
    header, rows = read_rows(path, spec)
    label_key = spec.label_key if spec.label_key in header else None
    root = path.parent
    images, captions, labels, paths, row_ids = [], [], [], [], []
    skipped = 0
    shape = None
    for i, row in enumerate(rows[:limit] if limit else rows):
        line = i + 2
        try:
            rel = (row.get(spec.img_key) or "").strip()
            if not rel:
                raise DataError("empty image path", file=str(path), row=line, field=spec.img_key)
            cap = (row.get(spec.caption_key) or "").strip()
            if not cap:
                raise DataError("empty caption", file=str(path), row=line, field=spec.caption_key)
            img_path = root / rel
            if not img_path.is_file():
                raise DataError(f"image not found: {img_path}", file=str(path), row=line,
                                field=spec.img_key)
            arr = None
            if not lazy:
                arr = _decode_checked(img_path, image_size, str(path), line, spec.img_key)
                if shape is None:
                    shape = arr.shape
                elif arr.shape != shape:
                    raise DataError(
                        f"image {img_path} is {arr.shape[1:]} but earlier ones are {shape[1:]}; "
                        "pass image_size to resize", file=str(path), row=line, field=spec.img_key)
            lab = -1
            if label_key is not None and (row.get(label_key) or "").strip() != "":
                try:
                    lab = int(row[label_key])
                except ValueError:
                    raise DataError(f"label {row[label_key]!r} is not an integer", file=str(path),
                                    row=line, field=label_key) from None
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        if arr is not None:
            images.append(arr)
        captions.append(cap)
        labels.append(lab)
        paths.append(rel)
        row_ids.append(line)
    if not captions:
        raise DataError("no usable rows", file=str(path))
    if lazy:
        from clipguard.data.lazy_images import LazyImages

        image_store = LazyImages(root, paths, row_ids, image_size, source=str(path), field=spec.img_key)
    else:
        image_store = torch.from_numpy(np.stack(images))
    return ImageCaptionData(
        images=image_store, captions=captions,
        labels=torch.tensor(labels, dtype=torch.long), paths=paths, source=str(path),
        rows=row_ids, skipped=skipped,
    )


def write_csv(path: str | Path, rows: list[dict[str, str]], header: list[str],
              separator: str = DEFAULT_SEPARATOR) -> None:
    """Write rows atomically in the same dialect ``load_csv`` reads."""
    from clipguard.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=header, delimiter=separator, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow(r)
