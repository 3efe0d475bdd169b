"""Small tensor helpers shared by training, evaluation and attacks (no other clipguard imports).

Pixels travel as uint8 until a step needs them, then as floats in [0, 1] (augmentations and
triggers work there), and are normalised with CLIP's statistics only at the model's door.
"""

from __future__ import annotations

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pixels(images_u8: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float in [0, 1] on ``device``."""
    return images_u8.to(device, non_blocking=True).float().div_(255.0)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP's input normalisation of [0, 1] pixels."""
    mean = torch.tensor(OPENAI_MEAN, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std
