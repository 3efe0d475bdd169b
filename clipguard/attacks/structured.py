"""Structured triggers (the stripes, text and triangles of PAR: Singh, Croce & Hein, "Perturb and
Recover", arXiv:2412.00727): a fixed pattern P with a coverage mask M, either blended into the
image or pasted as an opaque patch.

    blend:  x' = clip((1 - alpha M) x + alpha M P)   (M = 1: x' = (1 - alpha) x + alpha P)
    patch:  x' = (1 - M) x + M P inside a box          (M = 1: the box is replaced by P)

The box is the whole image for full-image blends (stripes, triangles) and a placed rectangle
otherwise (patches, rendered text); placement reuses patch.py's options (fixed position,
``random`` hashed from the image's pixels and the trigger seed, or the four ``corners``). This
module registers no attack; stripes.py, text_trigger.py and triangles.py do.
"""

from __future__ import annotations

import hashlib

import torch

from clipguard.attacks.base import Attack, PoisonContext
from clipguard.attacks.patch import box_offsets, check_location, resolve_size
from clipguard.errors import ConfigError

MODES = ("blend", "patch")


def as_float(value, what: str, attack: str, lo: float = 0.0, hi: float = 1.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"attack '{attack}': {what} must be a number, not {value!r}") from None
    if isinstance(value, bool) or not lo <= v <= hi:
        raise ConfigError(f"attack '{attack}': {what} must be in [{lo:g}, {hi:g}], not {value!r}")
    return v


def as_rgb(value, what: str, attack: str) -> list[float]:
    """One value or three values in [0, 1] -> [r, g, b]."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ConfigError(f"attack '{attack}': {what} must be one value or three values in [0, 1]")
    return [as_float(v, what, attack) for v in vals]


def on_u8_grid(x: torch.Tensor) -> torch.Tensor:
    """Round values to multiples of 1/255, so a lossless PNG stores the pattern exactly."""
    return (x * 255).round() / 255


def check_px(value, frac, *, minimum: int, what: str, attack: str) -> None:
    """Options ``value`` (px, or None) and ``frac`` checked before any image is seen."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"attack '{attack}': {what} must be a whole number of pixels, not {value!r}")
        if int(value) < minimum:
            raise ConfigError(f"attack '{attack}': {what} must be at least {minimum} px (got {int(value)})")
    elif as_float(frac, f"{what} fraction", attack, 0.0, 1.0) <= 0:
        raise ConfigError(f"attack '{attack}': {what} fraction must be above 0")


def scaled_px(value, frac, side: int, *, minimum: int, what: str, attack: str,
              shape: tuple[int, int, int]) -> int:
    """``value`` px if given, else max(minimum, round(side * frac)); never larger than the image."""
    _, h, w = shape
    check_px(value, frac, minimum=minimum, what=what, attack=attack)
    px = int(value) if value is not None else max(minimum, round(side * float(frac)))
    if px > side:
        raise ConfigError(f"attack '{attack}': {what} of {px} px is larger than the {h}x{w} image")
    return px


class StructuredTrigger(Attack):
    """A pattern ``P`` (3, h, w) and mask ``M`` (1, h, w) from ``make_pattern``, blended or pasted.

    Subclasses set ``full_image_blend`` when their blend covers the whole image (then placement
    options do not apply in blend mode) and may override ``__init__`` to expose their own options.
    """

    full_image_blend = True

    def __init__(self, mode: str = "blend", alpha: float = 0.2, size: int | None = None,
                 size_frac: float = 1 / 7, location: str = "fixed", position: str = "bottom-right",
                 margin: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"attack '{self.name}': mode must be one of {MODES}, not {mode!r}")
        check_location(location, position, self.name)
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ConfigError(f"attack '{self.name}': margin must be a whole number >= 0, not {margin!r}")
        self.mode, self.alpha = mode, as_float(alpha, "alpha", self.name)
        self.size, self.size_frac = size, size_frac
        self.location, self.position, self.margin = location, position, margin
        self.P: torch.Tensor | None = None
        self.M: torch.Tensor | None = None

    # ------------------------------------------------------------------ pattern
    def make_pattern(self, ctx: PoisonContext) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pattern_hw(self, shape: tuple[int, int, int]) -> tuple[int, int]:
        """(h, w) of a full-image pattern: a ``size`` x ``size`` patch in patch mode (its side kept
        in ``patch_px``), else the whole image (``patch_px`` None)."""
        _, H, W = shape
        if self.mode == "patch":
            self.patch_px = resolve_size(self.size, self.size_frac, shape, self.name)
            return self.patch_px, self.patch_px
        self.patch_px = None
        return H, W

    @property
    def covers_image(self) -> bool:
        return self.mode == "blend" and self.full_image_blend

    def setup(self, ctx: PoisonContext) -> None:
        super().setup(ctx)
        P, M = self.make_pattern(ctx)
        _, h, w = ctx.image_shape
        if P.shape[-2:] != M.shape[-2:] or P.shape[-2] > h or P.shape[-1] > w:
            raise ConfigError(f"attack '{self.name}': pattern of {tuple(P.shape[-2:])} px does not fit "
                              f"the {h}x{w} image")
        self.P, self.M = P.float(), M.float()

    def params(self) -> dict:
        out = super().params()
        assert self.P is not None and self.M is not None
        out["pattern_px"] = [int(self.P.shape[-2]), int(self.P.shape[-1])]
        digest = hashlib.sha256()
        for t in (self.P, self.M):
            digest.update((t * 255).round().to(torch.int16).contiguous().numpy().tobytes())
        out["pattern_sha256"] = digest.hexdigest()
        out["weight"] = self.alpha if self.mode == "blend" else 1.0
        return out

    # ------------------------------------------------------------------ trigger
    def offsets(self, image: torch.Tensor) -> list[tuple[int, int]]:
        if self.covers_image:
            return [(0, 0)]
        assert self.P is not None
        bh, bw = self.P.shape[-2:]
        return box_offsets(image, self.location, self.position, int(bh), int(bw),
                           int(self.trigger_seed or 0), self.margin)

    def trigger(self, pixels: torch.Tensor) -> torch.Tensor:
        assert self.P is not None and self.M is not None
        weight = self.alpha if self.mode == "blend" else 1.0
        P, WM = self.P.to(pixels), (weight * self.M).to(pixels)
        bh, bw = P.shape[-2:]
        out = pixels.clone()
        keep = 1 - WM                     # x (1 - w M) + w M P: exact where w M is 0 or 1
        if self.covers_image:
            return (out * keep + WM * P).clamp(0, 1)
        for b in range(len(out)):
            for top, left in self.offsets(pixels[b]):
                region = out[b, :, top:top + bh, left:left + bw]
                out[b, :, top:top + bh, left:left + bw] = region * keep + WM * P
        return out.clamp(0, 1)
