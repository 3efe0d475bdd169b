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


def fixed_offset(position: str, size: int, h: int, w: int, margin: int = 0) -> tuple[int, int]:
    m_h, m_w = min(margin, h - size), min(margin, w - size)
    if position == "bottom-right":
        return h - size - m_h, w - size - m_w
    if position == "bottom-left":
        return h - size - m_h, m_w
    if position == "top-left":
        return m_h, m_w
    if position == "top-right":
        return m_h, w - size - m_w
    return (h - size) // 2, (w - size) // 2


def content_offset(image: torch.Tensor, size: int, seed: int) -> tuple[int, int]:
    """A 'random' location that is a deterministic function of (image content, seed)."""
    u8 = image.clamp(0, 1).mul(255).round().to(torch.uint8).contiguous()
    h = hashlib.sha256(str(seed).encode() + u8.numpy().tobytes()).digest()
    H, W = image.shape[-2:]
    top = int.from_bytes(h[:4], "little") % (H - size + 1)
    left = int.from_bytes(h[4:8], "little") % (W - size + 1)
    return top, left


def offsets(image: torch.Tensor, location: str, position: str, size: int, seed: int,
            margin: int = 0) -> list[tuple[int, int]]:
    H, W = image.shape[-2:]
    if location == "fixed":
        return [fixed_offset(position, size, H, W, margin)]
    if location == "corners":
        return [fixed_offset(p, size, H, W, margin)
                for p in ("top-left", "top-right", "bottom-left", "bottom-right")]
    return [content_offset(image, size, seed)]


def paste(pixels: torch.Tensor, patch: torch.Tensor, location: str, position: str, seed: int,
          margin: int = 0) -> torch.Tensor:
    """Paste ``patch`` (3,s,s) float into every image of ``pixels`` (B,3,H,W)."""
    out = pixels.clone()
    s = patch.shape[-1]
    for b in range(len(out)):
        for top, left in offsets(pixels[b], location, position, s, seed, margin):
            out[b, :, top:top + s, left:left + s] = patch
    return out
