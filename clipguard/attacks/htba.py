"""HTBA-style patch: a small random colour matrix resized bilinearly to the patch size, top-left."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard.attacks import ATTACKS
from clipguard.attacks.badnet import PatchAttack
from clipguard.attacks.base import PoisonContext, seeded_generator


@ATTACKS.register("htba")
class HTBA(PatchAttack):
    name = "htba"

    def __init__(self, size: int | None = None, size_frac: float = 1 / 7, location: str = "fixed",
                 position: str = "top-left", margin: int = 0, cells: int = 3):
        super().__init__(size, size_frac, location, position, margin)
        self.cells = int(cells)

    def make_patch(self, size: int, ctx: PoisonContext) -> torch.Tensor:
        gen = seeded_generator("htba-pattern", ctx.trigger_seed)
        m = torch.rand(1, 3, self.cells, self.cells, generator=gen)
        p = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0]
        return (p.clamp(0, 1) * 255).round() / 255
