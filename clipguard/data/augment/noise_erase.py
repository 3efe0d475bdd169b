"""PAR's own training view: additive noise on half of the images, a small erased square on half.

Why: the PAR authors (nmndeep/PerturbAndRecover, ``utils.load_clip_model``) train on the
centre-cropped image with two mild corruptions and no crop or colour change. The push term then
acts on images that are still almost the originals, while the noise and the erased square break
small or low-amplitude triggers a little on every step. Batched like ``simclr_augment``: every
random number of the batch comes from one CPU ``torch.Generator`` in a fixed order, so a step's
seed gives the same views on every device and a resumed run replays them.

What the authors' transforms do, and what this function does on [0, 1] pixels:

- noise (``RandomApply(AddGaussianNoise(0, 0.2), p=0.5)``): x + clamp(N(0, std^2), 0, 1), clipped
  to [0, 1]. Their noise is clamped to [0, 1] before it is added, so only its positive half
  brightens the image;
- erasing (their ``RandomErasing(p=0.5, scale=(0.005, 0.01), ratio=(1, 1), value=0)`` after the
  normalisation): a square of 0.5-1% of the image area, at a uniform position, set to 0 in
  normalised space, i.e. to CLIP's mean colour in pixel space. Their sampler redraws a square
  whose side is not at least 5 pixels shorter than the image's; on images that small the square
  keeps its side and is placed anyway.
"""

from __future__ import annotations

import torch

from clipguard.tensors import OPENAI_MEAN


def noise_erase(pixels: torch.Tensor, generator: torch.Generator, *, noise_p: float = 0.5,
                noise_std: float = 0.2, erase_p: float = 0.5,
                erase_area: tuple[float, float] = (0.005, 0.01)) -> torch.Tensor:
    """(B,3,H,W) floats in [0, 1] -> the same shape, in [0, 1]: PAR's view of each image."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"noise_erase expects (B,3,H,W) pixels, got {tuple(pixels.shape)}")
    if not (0.0 <= noise_p <= 1.0 and 0.0 <= erase_p <= 1.0):
        raise ValueError(f"noise_p and erase_p must be in [0, 1], got {noise_p}, {erase_p}")
    lo, hi = erase_area
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"erase_area must satisfy 0 < low <= high < 1, got {erase_area}")
    n, _, h, w = pixels.shape
    x = pixels.float().clone()
    if n == 0:
        return x
    dev = x.device
    # every draw for the whole batch, in a fixed order, whatever the coins say
    noisy = torch.rand(n, generator=generator) < noise_p
    noise = torch.randn(x.shape, generator=generator).mul_(noise_std).clamp_(0.0, 1.0)
    erased = torch.rand(n, generator=generator) < erase_p
    area = lo + (hi - lo) * torch.rand(n, generator=generator)
    pos = torch.rand(n, 2, generator=generator)

    x = torch.where(noisy.to(dev).view(-1, 1, 1, 1), (x + noise.to(dev)).clamp_(0.0, 1.0), x)
    side = (area * h * w).sqrt().round().clamp(1, min(h, w)).long()
    top = (pos[:, 0] * (h - side + 1).float()).floor().long()
    left = (pos[:, 1] * (w - side + 1).float()).floor().long()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + side).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + side).view(-1, 1, 1)))
    box &= erased.view(-1, 1, 1)
    mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=dev).view(1, 3, 1, 1)
    return torch.where(box.to(dev).unsqueeze(1), mean.expand_as(x), x)
