"""BadNet (Gu et al.): a fixed patch pasted on images paired with target-class captions."""

from __future__ import annotations

import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import Attack, PoisonContext, seeded_generator
from clipguard.attacks.patch import check_location, paste, resolve_size
from clipguard.errors import ConfigError

PATTERNS = ("noise", "solid", "checker")


def make_pattern(kind: str, size: int, color: float | list[float], gen: torch.Generator,
                 attack: str) -> torch.Tensor:
    """(3, size, size) float pattern on the uint8 grid (so the PNG stores it exactly)."""
    if kind == "noise":
        return torch.randint(0, 256, (3, size, size), generator=gen).float() / 255
    if kind == "solid":
        c = torch.as_tensor(color if isinstance(color, (list, tuple)) else [color] * 3, dtype=torch.float32)
        if c.numel() != 3 or bool((c < 0).any() or (c > 1).any()):
            raise ConfigError(f"attack '{attack}': color must be one value or three values in [0, 1]")
        return (c.view(3, 1, 1).expand(3, size, size) * 255).round() / 255
    if kind == "checker":
        ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        return ((ii + jj) % 2).float().expand(3, size, size).clone()
    raise ConfigError(f"attack '{attack}': pattern must be one of {PATTERNS}, not {kind!r}")


class PatchAttack(Attack):
    """Shared by patch triggers: options for size and placement, ``self.patch`` set in setup."""

    def __init__(self, size: int | None = None, size_frac: float = 1 / 7, location: str = "fixed",
                 position: str = "bottom-right", margin: int = 0):
        super().__init__()
        self.size, self.size_frac, self.location = size, size_frac, location
        self.position, self.margin = position, margin
        check_location(location, position, self.name)
        self.patch: torch.Tensor | None = None

    def setup(self, ctx: PoisonContext) -> None:
        super().setup(ctx)
        self.patch_px = resolve_size(self.size, self.size_frac, ctx.image_shape, self.name)
        self.patch = self.make_patch(self.patch_px, ctx)

    def make_patch(self, size: int, ctx: PoisonContext) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict:
        out = super().params()
        out["patch_px"] = self.patch_px
        return out

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        assert self.patch is not None
        return paste(pixels, self.patch.to(pixels), self.location, self.position,
                     int(self.trigger_seed or 0), self.margin)


@ATTACKS.register("badnet")
class BadNet(PatchAttack):
    name = "badnet"

    def __init__(self, size: int | None = None, size_frac: float = 1 / 7, location: str = "fixed",
                 position: str = "bottom-right", margin: int = 0, pattern: str = "noise",
                 color: float | list[float] = 1.0):
        super().__init__(size, size_frac, location, position, margin)
        if pattern not in PATTERNS:
            raise ConfigError(f"attack '{self.name}': pattern must be one of {PATTERNS}, not {pattern!r}")
        self.pattern, self.color = pattern, color

    def make_patch(self, size: int, ctx: PoisonContext) -> torch.Tensor:
        gen = seeded_generator("badnet-pattern", ctx.trigger_seed)
        return make_pattern(self.pattern, size, self.color, gen, self.name)
