"""WaNet (Nguyen & Tran, 2021): an imperceptible smooth warp of the image.

A random field U(-1,1) of shape 2 x k x k, normalised by its mean absolute value, upsampled
bicubically to the image size, scaled by s / size, added to the identity sampling grid, rescaled
by ``grid_rescale``, clamped to [-1, 1] and applied with grid_sample. s = 0 is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import Attack, PoisonContext, seeded_generator
from clipguard.errors import ConfigError


def warp_grid(h: int, w: int, k: int, s: float, grid_rescale: float, gen: torch.Generator) -> torch.Tensor:
    ins = torch.rand(1, 2, k, k, generator=gen, dtype=torch.float64) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys = torch.linspace(-1, 1, h, dtype=torch.float64)
    xs = torch.linspace(-1, 1, w, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((xx, yy), dim=-1).unsqueeze(0)  # grid_sample wants (x, y)
    grid = (identity + s * noise / h) * grid_rescale
    return grid.clamp(-1, 1)


@ATTACKS.register("wanet")
class WaNet(Attack):
    name = "wanet"

    def __init__(self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0):
        super().__init__()
        if int(k) < 2:
            raise ConfigError("attack 'wanet': k (control grid size) must be at least 2")
        self.k, self.s, self.grid_rescale = int(k), float(s), float(grid_rescale)

    def setup(self, ctx: PoisonContext) -> None:
        super().setup(ctx)
        _, h, w = ctx.image_shape
        self.grid = warp_grid(h, w, self.k, self.s, self.grid_rescale,
                              seeded_generator("wanet-field", ctx.trigger_seed))

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(torch.float64).expand(len(pixels), -1, -1, -1)
        out = F.grid_sample(pixels.to(torch.float64), grid, mode="bilinear", padding_mode="border",
                            align_corners=True)
        return out.to(pixels.dtype).clamp(0, 1)
