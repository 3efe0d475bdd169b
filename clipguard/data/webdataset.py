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

from clipguard.data.csv_dataset import ImageCaptionData, _resize_center_crop
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
                im = _resize_center_crop(im.convert("RGB"), self.image_size)
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot decode image: {e}", file=shard,
                            row=self.rows[i] if self.rows else None, field=self.field) from None


def load_webdataset(pattern: str, *, image_size: int, caption_ext: str = "txt", label_ext: str = "cls",
                    skip_bad_rows: bool = False, limit: int | None = None) -> ImageCaptionData:
    shards = expand_urls(pattern)
    if not shards:
        raise DataError("no shard matches", file=pattern)
    paths, captions, labels, rows = [], [], [], []
    skipped = 0
    for shard in shards:
        if not Path(shard).is_file():
            raise DataError("shard not found", file=shard)
        if shard.endswith((".gz", ".tgz")):
            raise DataError("compressed shards have no random access; use uncompressed .tar", file=shard)
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        order: list[str] = []
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = member
            for k, key in enumerate(order):
                g = groups[key]
                try:
                    img = next((g[e] for e in IMAGE_EXTS if e in g), None)
                    if img is None:
                        raise DataError(f"sample '{key}' has no image ({'/'.join(IMAGE_EXTS)})",
                                        file=shard, row=k + 1, field="image")
                    if caption_ext not in g:
                        raise DataError(f"sample '{key}' has no .{caption_ext}", file=shard, row=k + 1,
                                        field=caption_ext)
                    cap = tar.extractfile(g[caption_ext]).read().decode("utf-8").strip()
                    if not cap:
                        raise DataError(f"sample '{key}' has an empty caption", file=shard, row=k + 1,
                                        field=caption_ext)
                    lab = -1
                    if label_ext in g:
                        txt = tar.extractfile(g[label_ext]).read().decode().strip()
                        try:
                            lab = int(txt)
                        except ValueError:
                            raise DataError(f"label {txt!r} is not an integer", file=shard, row=k + 1,
                                            field=label_ext) from None
                except DataError:
                    if not skip_bad_rows:
                        raise
                    skipped += 1
                    continue
                paths.append(f"{shard}::{img.offset_data}::{img.size}")
                captions.append(cap)
                labels.append(lab)
                rows.append(k + 1)
                if limit and len(paths) >= limit:
                    break
        if limit and len(paths) >= limit:
            break
    if not paths:
        raise DataError("no usable samples", file=pattern)
    images = TarImages(Path("/"), paths, rows, image_size, source=pattern, field="image")
    return ImageCaptionData(images=images, captions=captions, labels=torch.tensor(labels, dtype=torch.long),
                            paths=paths, source=pattern, rows=rows, skipped=skipped)


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
