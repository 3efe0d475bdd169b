"""Patch triggers share placement: size scaled with the image, fixed/random/four-corner location.

Default size: round(side / 7), i.e. 4 px on 28 px Fashion-MNIST and 32 px on 224 px. The papers
use 16/224 (1/14), which is 2 px here, too small a dose for a tiny model to learn at <= 1%.
"""

from __future__ import annotations

import hashlib

import torch

from clipguard.errors import ConfigError

LOCATIONS = ("fixed", "random", "corners")
POSITIONS = ("bottom-right", "bottom-left", "top-left", "top-right", "center")


def resolve_size(size: int | None, size_frac: float, shape: tuple[int, int, int], attack: str) -> int:
    _, h, w = shape
    side = min(h, w)
    s = int(size) if size is not None else max(1, round(side * float(size_frac)))
    if s < 1:
        raise ConfigError(f"attack '{attack}': patch size must be at least 1 px (got {s})")
    if s > side:
        raise ConfigError(f"attack '{attack}': patch of {s} px is larger than the {h}x{w} image")
    return s


def check_location(location: str, position: str, attack: str) -> None:
    if location not in LOCATIONS:
        raise ConfigError(f"attack '{attack}': location must be one of {LOCATIONS}, not {location!r}")
    if position not in POSITIONS:
        raise ConfigError(f"attack '{attack}': position must be one of {POSITIONS}, not {position!r}")


def box_offset(position: str, bh: int, bw: int, h: int, w: int, margin: int = 0) -> tuple[int, int]:
    """Top-left corner of a bh x bw box at a named position in an h x w image."""
    m_h, m_w = min(margin, h - bh), min(margin, w - bw)
    if position == "bottom-right":
        return h - bh - m_h, w - bw - m_w
    if position == "bottom-left":
        return h - bh - m_h, m_w
    if position == "top-left":
        return m_h, m_w
    if position == "top-right":
        return m_h, w - bw - m_w
    return (h - bh) // 2, (w - bw) // 2


def fixed_offset(position: str, size: int, h: int, w: int, margin: int = 0) -> tuple[int, int]:
    return box_offset(position, size, size, h, w, margin)


def content_box_offset(image: torch.Tensor, bh: int, bw: int, seed: int) -> tuple[int, int]:
    """A 'random' place for a bh x bw box that is a deterministic function of (image content, seed)."""
    u8 = image.clamp(0, 1).mul(255).round().to(torch.uint8).contiguous()
    d = hashlib.sha256(str(seed).encode() + u8.numpy().tobytes()).digest()
    H, W = image.shape[-2:]
    top = int.from_bytes(d[:4], "little") % (H - bh + 1)
    left = int.from_bytes(d[4:8], "little") % (W - bw + 1)
    return top, left


def content_offset(image: torch.Tensor, size: int, seed: int) -> tuple[int, int]:
    """A 'random' location that is a deterministic function of (image content, seed)."""
    return content_box_offset(image, size, size, seed)


def box_offsets(image: torch.Tensor, location: str, position: str, bh: int, bw: int, seed: int,
                margin: int = 0) -> list[tuple[int, int]]:
    """Top-left corners of a bh x bw box in ``image`` for a location (fixed, corners or random)."""
    H, W = image.shape[-2:]
    if location == "fixed":
        return [box_offset(position, bh, bw, H, W, margin)]
    if location == "corners":
        return [box_offset(p, bh, bw, H, W, margin)
                for p in ("top-left", "top-right", "bottom-left", "bottom-right")]
    return [content_box_offset(image, bh, bw, seed)]


def offsets(image: torch.Tensor, location: str, position: str, size: int, seed: int,
            margin: int = 0) -> list[tuple[int, int]]:
    return box_offsets(image, location, position, size, size, seed, margin)


def paste(pixels: torch.Tensor, patch: torch.Tensor, location: str, position: str, seed: int,
          margin: int = 0) -> torch.Tensor:
    """Paste ``patch`` (3,s,s) float into every image of ``pixels`` (B,3,H,W)."""
    out = pixels.clone()
    s = patch.shape[-1]
    for b in range(len(out)):
        for top, left in offsets(pixels[b], location, position, s, seed, margin):
            out[b, :, top:top + s, left:left + s] = patch
    return out
