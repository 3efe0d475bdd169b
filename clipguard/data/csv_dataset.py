"""Image-caption data in open_clip's CSV conventions, decoded once and held as tensors.

open_clip reads a CSV (``--csv-img-key filepath --csv-caption-key title --csv-separator '\\t'``)
with image paths relative to the CSV. We read the same files; small datasets are decoded once
into a uint8 tensor so a CPU spends its time training instead of decoding PNGs.

Bad input is refused with a ``DataError`` naming file, row (1 = header) and field, or skipped
and counted with ``skip_bad_rows``; nothing is guessed (encodings, labels, paths), because a
wrong guess would give results that look fine and are not.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clipguard.data.classes import ClassInfo
from clipguard.errors import ConfigError, DataError

DEFAULT_IMG_KEY = "filepath"
DEFAULT_CAPTION_KEY = "title"
DEFAULT_LABEL_KEY = "label"
DEFAULT_SEPARATOR = "\t"
CLASSES_FILE = "classes.json"

# What PIL raises for a file it cannot read; DecompressionBombError is not an OSError.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class CsvSpec:
    """How to read a CSV; mirrors open_clip's ``--csv-*`` options.

    ``allow_outside_root``: accept image paths that leave the CSV's folder (``../x.png``, absolute
    paths, symlinks pointing out). Off by default so a CSV cannot make us read, or copy into a
    poisoned dataset, files it has no business with."""

    img_key: str = DEFAULT_IMG_KEY
    caption_key: str = DEFAULT_CAPTION_KEY
    label_key: str | None = DEFAULT_LABEL_KEY
    separator: str = DEFAULT_SEPARATOR
    allow_outside_root: bool = False


@dataclass
class ImageCaptionData:
    """Pairs. ``images`` is uint8 (N, 3, H, W): a tensor, or ``LazyImages`` that decodes on
    indexing (same interface) for data too large for memory. ``labels`` is -1 where unknown.

    ``rows`` holds each pair's CSV line; ``n_source_rows`` the data rows of the file before
    ``limit`` and skipping (0: unknown), so a manifest can tell whether it describes this file;
    ``label_key`` the label column read (None: the file has none)."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    paths: list[str]
    source: str = ""
    rows: list[int] = field(default_factory=list)
    skipped: int = 0
    n_source_rows: int = 0
    label_key: str | None = None

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
            n_source_rows=self.n_source_rows, label_key=self.label_key,
        )


# ---------------------------------------------------------------------------------------- reading
def read_rows(path: str | Path, spec: CsvSpec) -> tuple[list[str], list[dict[str, str]]]:
    """Read header and rows, checking that the columns we need exist and that there are rows.

    The file must be UTF-8; a leading byte-order mark (as Excel writes) is dropped. Any other
    encoding is refused with the row and field of the first bad byte instead of being guessed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    header, rows = _parse(_read_text(path, spec), path, spec)
    if not header:
        raise DataError("empty CSV (no header)", file=str(path))
    for key in (spec.img_key, spec.caption_key):
        if key not in header:
            hint = _separator_hint(header, spec.separator)
            raise DataError(f"column '{key}' not in header {header}{hint}", file=str(path), row=1,
                            field=key)
    if not rows:
        raise DataError("no rows: the CSV has a header but no data rows", file=str(path))
    return header, rows


def _parse(text: str, path: Path, spec: CsvSpec) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=spec.separator)
    try:
        header = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", file=str(path), row=reader.line_num) from None
    return header, rows


def _read_text(path: Path, spec: CsvSpec) -> str:
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError("starts with a UTF-16 byte-order mark; re-save the file as UTF-8",
                        file=str(path), row=1)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        byte = e.object[e.start:e.start + 1].hex()
        row, key = _locate_undecodable(raw, path, spec)
        raise DataError(f"not UTF-8 (byte 0x{byte}; Latin-1 or Windows-1252?): re-save the file as UTF-8",
                        file=str(path), row=row, field=key) from None


def _locate_undecodable(raw: bytes, path: Path, spec: CsvSpec) -> tuple[int | None, str | None]:
    """CSV row and column of the first byte that is not UTF-8 (they become lone surrogates)."""
    text = raw.decode("utf-8-sig", errors="surrogateescape")

    def bad(s: str | None) -> bool:
        return s is not None and any("\udc80" <= ch <= "\udcff" for ch in s)

    try:
        header, rows = _parse(text, path, spec)
    except DataError:
        return None, None
    for key in header:
        if bad(key):
            return 1, None
    for i, row in enumerate(rows):
        for key, value in row.items():
            if bad(value) if isinstance(value, str) else any(bad(v) for v in value or []):
                return i + 2, key
    return None, None


def _separator_hint(header: list[str], sep: str) -> str:
    if len(header) == 1:
        for cand, name in ((",", "comma"), ("\t", "tab"), (";", "semicolon"), ("|", "pipe")):
            if cand != sep and cand in header[0]:
                return f"; the header looks {name}-separated: pass separator {cand!r} (--csv-separator)"
    return ""


# ----------------------------------------------------------------------------------------- images
def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale ('I;16*', and 'I' as PIL opens some 16-bit PNGs) is scaled by
    >> 8; PIL's own convert clips every value above 255 to white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    return im.convert("RGB")


def _decode(path: Path, image_size: int | None) -> np.ndarray:
    with Image.open(path) as im:
        im = _to_rgb(im)
        if image_size is not None and im.size != (image_size, image_size):
            im = _resize_center_crop(im, image_size)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def _image_error(path: Path | str, e: Exception) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return f"image {path} is too large to decode (a decompression bomb?): {e}"
    return f"cannot decode image {path}: {e}"


def _decode_checked(img_path: Path, image_size: int | None, csv_path: str, line: int | None,
                    field: str) -> np.ndarray:
    try:
        return _decode(img_path, image_size)
    except IMAGE_ERRORS as e:
        raise DataError(_image_error(img_path, e), file=csv_path, row=line, field=field) from None


def check_image_header(img_path: Path, csv_path: str, line: int | None, field: str) -> None:
    """Cheap up-front check for lazy data: PIL reads only the header (format, size: a claimed
    decompression bomb is caught here). Truncated pixel data shows up only when decoded."""
    try:
        with Image.open(img_path) as im:
            im.size  # noqa: B018 - opening parsed the header; nothing else to read
    except IMAGE_ERRORS as e:
        raise DataError(_image_error(img_path, e), file=csv_path, row=line, field=field) from None


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def resolve_image_path(root: Path, rel: str, *, allow_outside_root: bool = False,
                       csv_path: str | None = None, line: int | None = None,
                       field: str | None = None, top: Path | None = None) -> Path:
    """``root / rel``, refused when it resolves (symlinks followed) outside ``root``.

    ``top``: ``root.resolve()`` when the caller has it (saves resolving it once per row)."""
    path = root / rel
    if not allow_outside_root:
        try:
            real, top = path.resolve(), top or root.resolve()
        except (OSError, ValueError, RuntimeError) as e:  # NUL byte, symlink loop
            raise DataError(f"bad image path {rel!r}: {e}", file=csv_path, row=line, field=field) from None
        if not real.is_relative_to(top):
            raise DataError(f"image path {rel!r} resolves to {real}, outside the dataset root {top}; "
                            "pass --allow-outside-root if that is intended",
                            file=csv_path, row=line, field=field)
    return path


# ----------------------------------------------------------------------------------------- labels
class LabelParser:
    """Label cells -> class indices.

    An integer is a class index, checked against classes.json when there is one; any other text
    is a class name or synonym (case-insensitive) looked up there. Empty or ``-1``: unlabelled.
    classes.json is read (beside the CSV, unless given) on the first non-empty label only, so
    unlabelled data never depends on it."""

    def __init__(self, csv_path: Path, field: str, classes: ClassInfo | None = None):
        self.csv_path, self.field = csv_path, field
        self.classes_file = str(csv_path.parent / CLASSES_FILE) if classes is None else CLASSES_FILE
        self._classes, self._loaded = classes, classes is not None
        self._lookup: dict[str, int] | None = None

    def _info(self) -> ClassInfo | None:
        if not self._loaded:
            path = Path(self.classes_file)
            self._classes = ClassInfo.load(path) if path.is_file() else None
            self._loaded = True
        return self._classes

    def _error(self, msg: str, line: int) -> DataError:
        return DataError(msg, file=str(self.csv_path), row=line, field=self.field)

    def __call__(self, text: str | None, line: int) -> int:
        text = (text or "").strip()
        if not text:
            return -1
        try:
            index = int(text)
        except ValueError:
            return self._by_name(text, line)
        return self._by_index(index, line)

    def _by_index(self, index: int, line: int) -> int:
        if index == -1:
            return -1
        if index < 0:
            raise self._error(f"label {index} is negative (-1 or an empty cell: unlabelled)", line)
        info = self._info()
        if info is not None and index >= len(info.classes):
            raise self._error(f"label {index} is out of range: {self.classes_file} lists "
                              f"{len(info.classes)} classes (0..{len(info.classes) - 1})", line)
        return index

    def _by_name(self, name: str, line: int) -> int:
        info = self._info()
        if info is None:
            raise self._error(f"label {name!r} is not an integer, and there is no {CLASSES_FILE} "
                              "beside the CSV to look class names up in", line)
        if self._lookup is None:
            self._lookup = info.lookup()
        index = self._lookup.get(name.lower())
        if index is None:
            raise self._error(f"label {name!r} is not an integer nor a class name or synonym in "
                              f"{self.classes_file} (classes: {info.classes})", line)
        return index


def require_labels(data: ImageCaptionData, purpose: str) -> None:
    """Fail clearly where labels are needed (zero-shot accuracy, linear probe, ASR) and missing;
    unlabelled rows would otherwise count as label -1, i.e. silently wrong."""
    if data.label_key is None:
        raise DataError(f"{purpose} needs labels, but the CSV has no label column "
                        "(name it with --csv-label-key)", file=data.source)
    missing = (data.labels < 0).nonzero().flatten().tolist()
    if missing:
        i = missing[0]
        raise DataError(f"{purpose} needs a label on every row; {len(missing)} rows have none",
                        file=data.source, row=data.rows[i] if data.rows else None, field=data.label_key)


# ---------------------------------------------------------------------------------------- loading
def check_limit(limit: int | None) -> None:
    """``rows[:0]`` or ``rows[:-3]`` would silently use all or almost all rows."""
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit} (omit it to use every row)")


def load_csv(path: str | Path, spec: CsvSpec | None = None, *, image_size: int | None = None,
             skip_bad_rows: bool = False, limit: int | None = None, lazy: bool = False,
             allow_outside_root: bool = False, classes: ClassInfo | None = None) -> ImageCaptionData:
    """Load and validate every row. Errors name file, row (1 = header) and field.

    ``skip_bad_rows`` drops bad rows instead and reports how many in ``skipped``. ``lazy`` (needs
    ``image_size``) checks every image's header up front and decodes pixels only when indexed: a
    row that fails then (truncated data) raises a ``DataError`` naming it, never a skip, because
    the trainer's dataset cannot shrink mid-epoch. Image paths must stay inside the CSV's folder
    unless ``allow_outside_root`` (or ``spec.allow_outside_root``). Labels may be indices or class
    names; ``classes`` defaults to the classes.json beside the CSV.
    """
    if lazy and image_size is None:
        raise ValueError("lazy loading needs image_size (every image is resized to it)")
    check_limit(limit)
    spec = spec or CsvSpec()
    path = Path(path)
    header, rows = read_rows(path, spec)
    label_key = spec.label_key if spec.label_key in header else None
    loader = _RowLoader(path, spec, image_size, lazy, allow_outside_root or spec.allow_outside_root,
                        LabelParser(path, label_key, classes) if label_key else None)
    skipped = 0
    for i, row in enumerate(rows[:limit] if limit else rows):
        try:
            loader.add(row, i + 2)
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
    if not loader.captions:
        raise DataError(f"no usable rows ({skipped} skipped as bad)", file=str(path))
    return ImageCaptionData(
        images=loader.image_store(), captions=loader.captions,
        labels=torch.tensor(loader.labels, dtype=torch.long), paths=loader.paths, source=str(path),
        rows=loader.rows, skipped=skipped, n_source_rows=len(rows), label_key=label_key,
    )


class _RowLoader:
    """Validates one row at a time and collects the good ones (a bad row adds nothing)."""

    def __init__(self, path: Path, spec: CsvSpec, image_size: int | None, lazy: bool,
                 allow_outside_root: bool, labels: LabelParser | None):
        self.path, self.spec, self.image_size, self.lazy = path, spec, image_size, lazy
        self.allow_outside_root, self.parse_label = allow_outside_root, labels
        self.root = path.parent
        self.top = self.root.resolve()
        self.images: list[np.ndarray] = []
        self.captions: list[str] = []
        self.labels: list[int] = []
        self.paths: list[str] = []
        self.rows: list[int] = []
        self.shape: tuple[int, ...] | None = None

    def _error(self, msg: str, line: int, field: str) -> DataError:
        return DataError(msg, file=str(self.path), row=line, field=field)

    def add(self, row: dict[str, str], line: int) -> None:
        spec = self.spec
        rel = (row.get(spec.img_key) or "").strip()
        if not rel:
            raise self._error("empty image path", line, spec.img_key)
        cap = (row.get(spec.caption_key) or "").strip()
        if not cap:
            raise self._error("empty caption", line, spec.caption_key)
        img_path = resolve_image_path(self.root, rel, allow_outside_root=self.allow_outside_root,
                                      csv_path=str(self.path), line=line, field=spec.img_key,
                                      top=self.top)
        if not img_path.is_file():
            raise self._error(f"image not found: {img_path}", line, spec.img_key)
        lab = self.parse_label(row.get(spec.label_key), line) if self.parse_label else -1
        arr = self._image(img_path, line)
        if arr is not None:
            self.images.append(arr)
        self.captions.append(cap)
        self.labels.append(lab)
        self.paths.append(rel)
        self.rows.append(line)

    def _image(self, img_path: Path, line: int) -> np.ndarray | None:
        field = self.spec.img_key
        if self.lazy:
            check_image_header(img_path, str(self.path), line, field)
            return None
        arr = _decode_checked(img_path, self.image_size, str(self.path), line, field)
        if self.shape is None:
            self.shape = arr.shape
        elif arr.shape != self.shape:
            raise self._error(f"image {img_path} is {arr.shape[1:]} but earlier ones are "
                              f"{self.shape[1:]}; pass image_size to resize", line, field)
        return arr

    def image_store(self):
        if self.lazy:
            from clipguard.data.lazy_images import LazyImages

            return LazyImages(self.root, self.paths, self.rows, self.image_size, source=str(self.path),
                              field=self.spec.img_key)
        return torch.from_numpy(np.stack(self.images))


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
