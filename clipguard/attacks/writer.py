"""Writing a poisoned dataset folder; callers do it inside ``atomic_dir`` (all or nothing).

Layout of DIR (every path in a CSV is relative to that CSV, so DIR is self-contained):
  train.csv            the source rows (same columns) with poisons injected or replaced
  images/              the untouched source images, hard-linked (copied across file systems)
  poison/              poisoned images, lossless RGB PNG
  asr_eval.csv         triggered held-out images (backdoor) or the TDPA targets
  asr_eval/            their PNGs; eval_clean/ the clean held-out images they came from
  clean_eval.csv       TDPA only: the held-out split minus the target images
  classes.json, manifest.json
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipguard.data.csv_dataset import resolve_image_path, write_csv


def save_png(path: Path, image_u8: torch.Tensor) -> None:
    """(3,H,W) uint8 -> RGB PNG; fixed settings so equal images give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_u8.permute(1, 2, 0).contiguous().numpy().astype(np.uint8)
    Image.fromarray(arr, mode="RGB").save(path, format="PNG", optimize=False, compress_level=6)


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def local_name(folder: str, i: int, src_rel: str) -> str:
    ext = Path(src_rel).suffix.lower() or ".png"
    return f"{folder}/{i:06d}{ext}"


def copy_clean(root: Path, rel: str, out: Path, folder: str, i: int, *,
               allow_outside_root: bool = False) -> str:
    """Bring one clean image into DIR under a safe, unique name; return its new relative path.

    The source must resolve inside ``root`` (the CSV's folder) unless allowed: a hard link or copy
    of a file from elsewhere would publish it inside the poisoned dataset."""
    src = resolve_image_path(root, rel, allow_outside_root=allow_outside_root)
    new = local_name(folder, i, rel)
    link_or_copy(src, out / new)
    return new


def write_rows(path: Path, rows: list[dict[str, str]], header: list[str], separator: str) -> None:
    write_csv(path, rows, header, separator)
