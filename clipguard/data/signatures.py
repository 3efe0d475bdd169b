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
