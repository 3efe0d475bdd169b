"""Triangles (PAR, arXiv:2412.00727; its code's ``tri_patt`` trigger): a tiling of square cells,
each split along its diagonal into two right triangles of different value.

In a cell of ``cell`` px, pixel (i, j) (row, column inside the cell) belongs to the lower-left
triangle when i >= j. ``palette=grey``: lower-left triangles take ``levels[0]``, upper-right
ones ``levels[1]`` (PAR: 0.4 and 0.8, all channels); ``palette=random``: every triangle gets its
own colour, fixed by the trigger seed.

- ``mode=blend``: x' = (1 - alpha) x + alpha T over the whole image.
- ``mode=patch``: a ``size`` x ``size`` patch of the same tiling, pasted like a BadNet patch.

Default cell: round(side / 16), at least 4 px: PAR's 14 px at 224 px, 4 px at 28 px (a smaller
cell no longer looks like two triangles).
"""

from __future__ import annotations

import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import PoisonContext, seeded_generator
from clipguard.attacks.structured import StructuredTrigger, as_float, check_px, on_u8_grid, scaled_px
from clipguard.errors import ConfigError

PALETTES = ("grey", "random")


@ATTACKS.register("triangles")
class Triangles(StructuredTrigger):
    name = "triangles"

    def __init__(self, mode: str = "blend", alpha: float = 0.2, cell: int | None = None,
                 cell_frac: float = 1 / 16, palette: str = "grey", levels: list[float] | tuple = (0.4, 0.8),
                 size: int | None = None, size_frac: float = 1 / 7, location: str = "fixed",
                 position: str = "bottom-right", margin: int = 0):
        super().__init__(mode, alpha, size, size_frac, location, position, margin)
        if palette not in PALETTES:
            raise ConfigError(f"attack 'triangles': palette must be one of {PALETTES}, not {palette!r}")
        if not isinstance(levels, (list, tuple)) or len(levels) != 2:
            raise ConfigError(f"attack 'triangles': levels must be two values in [0, 1], not {levels!r}")
        check_px(cell, cell_frac, minimum=2, what="triangle cell", attack=self.name)
        self.cell, self.cell_frac, self.palette = cell, cell_frac, palette
        self.levels = [as_float(v, "levels", self.name) for v in levels]

    def make_pattern(self, ctx: PoisonContext) -> tuple[torch.Tensor, torch.Tensor]:
        shape = ctx.image_shape
        _, H, W = shape
        h, w = self.pattern_hw(shape)
        # a cell given explicitly may be as small as 2 px; the derived default is at least 4 px
        self.cell_px = scaled_px(self.cell, self.cell_frac, min(H, W), minimum=2 if self.cell is not None else 4,
                                 what="triangle cell", attack=self.name, shape=shape)
        c = self.cell_px
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        upper = ((ii % c) < (jj % c)).long()                      # 0: lower-left, 1: upper-right
        if self.palette == "grey":
            lv = on_u8_grid(torch.tensor(self.levels))
            P = lv[upper].unsqueeze(0).expand(3, h, w).clone()
        else:
            rows, cols = -(-h // c), -(-w // c)
            gen = seeded_generator("triangles-pattern", ctx.trigger_seed)
            colours = on_u8_grid(torch.rand(rows, cols, 2, 3, generator=gen))
            P = colours[ii // c, jj // c, upper].permute(2, 0, 1).contiguous()
        return P, torch.ones(1, h, w)

    def params(self) -> dict:
        out = super().params()
        out["cell_px"] = self.cell_px
        out["patch_px"] = self.patch_px
        return out
