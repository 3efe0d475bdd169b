"""SIG (Barni et al.): a horizontal sinusoid, x' = x + delta * sin(2 pi j f / width)."""

from __future__ import annotations

import math

import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import Attack, PoisonContext


def sig_signal(height: int, width: int, delta: float, f: float) -> torch.Tensor:
    j = torch.arange(width, dtype=torch.float64)
    row = delta * torch.sin(2 * math.pi * j * f / width)
    return row.view(1, 1, width).expand(1, height, width).float()


@ATTACKS.register("sig")
class SIG(Attack):
    name = "sig"

    def __init__(self, delta: float = 20 / 255, f: float = 6):
        super().__init__()
        self.delta, self.f = float(delta), float(f)

    def setup(self, ctx: PoisonContext) -> None:
        super().setup(ctx)
        _, h, w = ctx.image_shape
        self.v = sig_signal(h, w, self.delta, self.f)

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels + self.v.to(pixels)).clamp(0, 1)
