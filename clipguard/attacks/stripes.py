"""Random stripes (PAR, arXiv:2412.00727; its code's ``blended_rs`` and ``badnet_rs`` triggers).

Stripes ``width`` px wide (vertical by default); each stripe gets a random sign per colour
channel, fixed by the trigger seed.

- ``mode=blend``: x' = clip((1 - alpha) x + alpha S) over the whole image, S = +1 or -1 per
  stripe and channel (PAR blends the signs, so each stripe brightens or darkens each channel).
- ``mode=patch``: a ``size`` x ``size`` patch of the same stripes in colours 0/1 (the signs
  mapped to 0 and 1, as PAR's patch ends up once clipped), pasted like a BadNet patch.

Default stripe width: round(side / 224), at least 1 px: PAR's 1 px at 224 px, 1 px at 28 px.
"""

from __future__ import annotations

import math

import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import PoisonContext, seeded_generator
from clipguard.attacks.structured import StructuredTrigger, check_px, scaled_px
from clipguard.errors import ConfigError

ORIENTATIONS = ("vertical", "horizontal")


@ATTACKS.register("stripes")
class Stripes(StructuredTrigger):
    name = "stripes"

    def __init__(self, mode: str = "blend", alpha: float = 0.2, width: int | None = None,
                 width_frac: float = 1 / 224, orientation: str = "vertical", size: int | None = None,
                 size_frac: float = 1 / 7, location: str = "fixed", position: str = "bottom-right",
                 margin: int = 0):
        super().__init__(mode, alpha, size, size_frac, location, position, margin)
        if orientation not in ORIENTATIONS:
            raise ConfigError(f"attack 'stripes': orientation must be one of {ORIENTATIONS}, not {orientation!r}")
        check_px(width, width_frac, minimum=1, what="stripe width", attack=self.name)
        self.width, self.width_frac, self.orientation = width, width_frac, orientation

    def make_pattern(self, ctx: PoisonContext) -> tuple[torch.Tensor, torch.Tensor]:
        shape = ctx.image_shape
        _, H, W = shape
        h, w = self.pattern_hw(shape)
        self.width_px = scaled_px(self.width, self.width_frac, min(H, W), minimum=1, what="stripe width",
                                  attack=self.name, shape=shape)
        across = w if self.orientation == "vertical" else h
        n = math.ceil(across / self.width_px)
        gen = seeded_generator("stripes-pattern", ctx.trigger_seed)
        signs = torch.randint(0, 2, (n, 3), generator=gen).t().float() * 2 - 1   # stripe k: signs[:, k]
        stripe = signs[:, torch.arange(across) // self.width_px]          # (3, across)
        if self.orientation == "vertical":
            P = stripe.view(3, 1, w).expand(3, h, w).clone()
        else:
            P = stripe.view(3, h, 1).expand(3, h, w).clone()
        if self.mode == "patch":
            P = (P + 1) / 2
        return P, torch.ones(1, h, w)

    def params(self) -> dict:
        out = super().params()
        out["width_px"] = self.width_px
        out["patch_px"] = self.patch_px
        return out
