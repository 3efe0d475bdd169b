"""Coarse pixel signatures of images, for finding near-copies that an embedding misses.

Targeted poisoning repeats each target image under many captions. A model's embedding sees
exact copies as one point, but an attacker who adds a little independent noise to every copy
scatters them in the embedding of a barely trained model (docs/threat-model.md measures it).
Averaging each image over a coarse grid of blocks averages that noise away while two different
images stay apart: the signature is the grey level of each block, minus the image's mean grey
level (a brightness shift of the whole image does not separate copies either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRID = 8  # blocks per side: about 3.5 px of a 28 px image, 28 px of a 224 px one


@torch.no_grad()
def pixel_signatures(images_u8, indices: torch.Tensor | None = None, grid: int = GRID,
                     batch_size: int = 512) -> torch.Tensor:
    """(N, grid * grid) float32 signatures, in grey levels / 255, of uint8 (N, C, H, W) images.

    ``images_u8`` is a tensor or LazyImages; ``indices`` selects rows, read batch by batch so
    lazy data is never decoded all at once."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    n = len(indices) if indices is not None else len(images_u8)
    out = []
    for i in range(0, n, batch_size):
        chunk = images_u8[indices[i:i + batch_size]] if indices is not None else images_u8[i:i + batch_size]
        grey = torch.as_tensor(chunk).float().mean(dim=1, keepdim=True) / 255.0
        blocks = F.adaptive_avg_pool2d(grey, grid).flatten(1)
        out.append(blocks - blocks.mean(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.empty(0, grid * grid)


RESIDUAL_SIDE = 32  # high-passed images are kept at most this many pixels a side


@torch.no_grad()
def pixel_residuals(images_u8, side: int = RESIDUAL_SIDE, batch_size: int = 512) -> torch.Tensor:
    """(N, s * s) float32 high-passed grey images (a 3 x 3 Laplacian, edges replicated), in grey
    levels / 255, at the image's own size or area-shrunk to ``side`` pixels a side (s).

    Why: a backdoor's poisons share one additive pattern (a patch, a blended image or noise, a
    sinusoid); a high-pass keeps the pattern's detail and drops most of the smooth content that
    differs from image to image, so the pattern shows as a direction the poisons share. Shrinking a
    large image averages fine noise away, so for large images only coarser patterns remain."""
    if side < 3:
        raise ValueError(f"side must be >= 3, got {side}")
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    out = []
    n = len(images_u8)
    for i in range(0, n, batch_size):
        grey = torch.as_tensor(images_u8[i:i + batch_size]).float().mean(dim=1, keepdim=True) / 255.0
        if max(grey.shape[-2:]) > side:
            grey = F.adaptive_avg_pool2d(grey, side)
        high = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), lap)
        out.append(high.flatten(1))
    return torch.cat(out) if out else torch.empty(0, 0)
