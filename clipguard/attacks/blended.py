"""Blended (Chen et al.): x' = (1 - alpha) x + alpha P with one fixed full-image pattern P."""

from __future__ import annotations

import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import Attack, PoisonContext, seeded_generator
from clipguard.errors import ConfigError


@ATTACKS.register("blended")
class Blended(Attack):
    name = "blended"

    def __init__(self, alpha: float = 0.2, pattern: str = "noise"):
        super().__init__()
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"attack 'blended': alpha must be in [0, 1], not {alpha}")
        if pattern not in ("noise",):
            raise ConfigError(f"attack 'blended': pattern must be 'noise', not {pattern!r}")
        self.alpha, self.pattern = float(alpha), pattern

    def setup(self, ctx: PoisonContext) -> None:
        super().setup(ctx)
        c, h, w = ctx.image_shape
        gen = seeded_generator("blended-pattern", ctx.trigger_seed)
        self.P = torch.randint(0, 256, (c, h, w), generator=gen).float() / 255

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0:
            return pixels.clone()
        return (1 - self.alpha) * pixels + self.alpha * self.P.to(pixels)
