"""webdataset shards (open_clip's ``--dataset-type webdataset``) read with random access.

A shard is an uncompressed tar of ``KEY.jpg|png|webp`` + ``KEY.txt`` (+ optional ``KEY.cls``).
We index every member's offset once, keep captions and labels in memory and decode images on
demand, so shards flow through the same index-based trainer as CSV data (SafeCLIP needs to score
every pair by index, which a pure stream cannot give).
"""

from __future__ import annotations

import glob
import re
import tarfile
import threading
from io import BytesIO
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from clipguard.data.csv_dataset import (
    IMAGE_ERRORS,
    ImageCaptionData,
    _image_error,
    _resize_center_crop,
    _to_rgb,
    check_limit,
)
from clipguard.data.lazy_images import LazyImages
from clipguard.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_urls(pattern: str) -> list[str]:
    """``dir/{00000..00009}.tar``, ``a.tar::b.tar`` (open_clip's separator) and globs."""
    out: list[str] = []
    for part in pattern.split("::"):
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            a, b = m.group(1), m.group(2)
            for i in range(int(a), int(b) + 1):
                out += expand_urls(part[:m.start()] + str(i).zfill(len(a)) + part[m.end():])
        elif any(c in part for c in "*?["):
            out += sorted(glob.glob(part))
        else:
            out.append(part)
    return out


class TarImages(LazyImages):
    """``paths`` are 'shard::offset::size' strings: cheap to subset and to pickle."""

    _local = threading.local()

    def _decode(self, i: int) -> np.ndarray:
        shard, offset, size = self.paths[i].rsplit("::", 2)
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        f = handles.get(shard) or handles.setdefault(shard, open(shard, "rb"))
        f.seek(int(offset))
        raw = f.read(int(size))
        try:
            with Image.open(BytesIO(raw)) as im:
                im = _resize_center_crop(_to_rgb(im), self.image_size)
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
        except IMAGE_ERRORS as e:
            raise DataError(_image_error(f"member at byte {offset}", e), file=shard,
                            row=self.rows[i] if self.rows else None, field=self.field) from None


def load_webdataset(pattern: str, *, image_size: int, caption_ext: str = "txt", label_ext: str = "cls",
                    skip_bad_rows: bool = False, limit: int | None = None) -> ImageCaptionData:
    """Index shards; a sample (row = its 1-based position in the shard) with no image, an image
    whose header PIL cannot read, or a missing, empty or non-UTF-8 caption is a ``DataError``, or
    skipped and counted with ``skip_bad_rows``. Pixels are decoded lazily (see ``LazyImages``)."""
    check_limit(limit)
    shards = expand_urls(pattern)
    if not shards:
        raise DataError("no shard matches", file=pattern)
    acc = _Samples(caption_ext, label_ext, skip_bad_rows, limit)
    for shard in shards:
        if not Path(shard).is_file():
            raise DataError("shard not found", file=shard)
        if shard.endswith((".gz", ".tgz")):
            raise DataError("compressed shards have no random access; use uncompressed .tar", file=shard)
        acc.read_shard(shard)
        if acc.full():
            break
    if not acc.paths:
        raise DataError(f"no usable samples ({acc.skipped} skipped as bad)", file=pattern)
    images = TarImages(Path("/"), acc.paths, acc.rows, image_size, source=pattern, field="image")
    return ImageCaptionData(images=images, captions=acc.captions,
                            labels=torch.tensor(acc.labels, dtype=torch.long), paths=acc.paths,
                            source=pattern, rows=acc.rows, skipped=acc.skipped,
                            label_key=label_ext if any(x >= 0 for x in acc.labels) else None)


class _Samples:
    """Collects the good samples of a run of shards, counting the skipped ones."""

    def __init__(self, caption_ext: str, label_ext: str, skip_bad_rows: bool, limit: int | None):
        self.caption_ext, self.label_ext = caption_ext, label_ext
        self.skip_bad_rows, self.limit = skip_bad_rows, limit
        self.paths: list[str] = []
        self.captions: list[str] = []
        self.labels: list[int] = []
        self.rows: list[int] = []
        self.skipped = 0

    def full(self) -> bool:
        return bool(self.limit) and len(self.paths) >= self.limit

    def read_shard(self, shard: str) -> None:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if member.isfile():
                        key, _, ext = member.name.partition(".")
                        groups.setdefault(key, {})[ext.lower()] = member
                for k, (key, g) in enumerate(groups.items()):
                    try:
                        self._add(tar, shard, key, g, k + 1)
                    except DataError:
                        if not self.skip_bad_rows:
                            raise
                        self.skipped += 1
                    if self.full():
                        return
        except tarfile.TarError as e:
            raise DataError(f"not a readable tar file: {e}", file=shard) from None

    def _add(self, tar: tarfile.TarFile, shard: str, key: str, g: dict[str, tarfile.TarInfo],
             row: int) -> None:
        img = next((g[e] for e in IMAGE_EXTS if e in g), None)
        if img is None:
            raise DataError(f"sample '{key}' has no image ({'/'.join(IMAGE_EXTS)})", file=shard, row=row,
                            field="image")
        cap = self._text(tar, shard, key, g, self.caption_ext, row)
        if not cap:
            raise DataError(f"sample '{key}' has an empty caption", file=shard, row=row,
                            field=self.caption_ext)
        lab = -1
        if self.label_ext in g:
            txt = self._text(tar, shard, key, g, self.label_ext, row)
            try:
                lab = int(txt)
            except ValueError:
                raise DataError(f"label {txt!r} is not an integer", file=shard, row=row,
                                field=self.label_ext) from None
        try:
            with Image.open(tar.extractfile(img)) as im:
                im.size  # noqa: B018 - opening parsed the header
        except IMAGE_ERRORS as e:
            raise DataError(_image_error(f"'{img.name}'", e), file=shard, row=row, field="image") from None
        self.paths.append(f"{shard}::{img.offset_data}::{img.size}")
        self.captions.append(cap)
        self.labels.append(lab)
        self.rows.append(row)

    @staticmethod
    def _text(tar: tarfile.TarFile, shard: str, key: str, g: dict[str, tarfile.TarInfo], ext: str,
              row: int) -> str:
        if ext not in g:
            raise DataError(f"sample '{key}' has no .{ext}", file=shard, row=row, field=ext)
        raw = tar.extractfile(g[ext]).read()
        try:
            return raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            raise DataError(f"sample '{key}': .{ext} is not UTF-8 (Latin-1?); re-encode it as UTF-8",
                            file=shard, row=row, field=ext) from None


def write_shards(data: ImageCaptionData, out_dir: str | Path, per_shard: int = 1000,
                 ids: Sequence[int] | None = None) -> list[Path]:
    """Write a dataset as PNG+txt(+cls) shards (used by tests and to convert CSV data)."""
    from clipguard.io import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = list(ids if ids is not None else range(len(data)))
    written = []
    for s in range(0, len(ids), per_shard):
        path = out_dir / f"{s // per_shard:05d}.tar"
        with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
            for i in ids[s:s + per_shard]:
                key = f"{i:09d}"
                buf = BytesIO()
                Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
                parts = {"png": buf.getvalue(), "txt": data.captions[i].encode()}
                if int(data.labels[i]) >= 0:
                    parts["cls"] = str(int(data.labels[i])).encode()
                for ext, payload in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, BytesIO(payload))
        written.append(path)
    return written
