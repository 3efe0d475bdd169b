"""A rendered text string as the trigger (PAR, arXiv:2412.00727; its code's watermark-text
trigger: red text, blended where the text is).

The string is rendered once with Pillow's default font (FreeType's Aileron when Pillow has
FreeType, else its bitmap font) at 64 px, cut to the box of its ink and resized with a box
filter to ``height`` px high, keeping its aspect ratio (so ``height`` is the height of the
letters themselves). The coverage m in [0, 1] of each pixel (anti-aliased edges) is kept on the
uint8 grid.

- ``mode=blend``: x' = x + alpha * m * (colour - x) inside the text box: only the glyphs change.
- ``mode=patch``: the whole box is replaced by the text on a ``background`` colour (opaque).

Default height: round(side / 4), so 7 px at 28 px and 56 px at 224 px. The box is placed like a
patch (``position``, ``location``, ``margin``); text wider than the image is an error. The
rendering depends on the installed Pillow (and FreeType): the manifest records the Pillow
version, the font and a hash of the pattern, and the poisoned and ASR images carry the trigger.
"""

from __future__ import annotations

import numpy as np
import torch

from clipguard.attacks import ATTACKS
from clipguard.attacks.base import PoisonContext
from clipguard.attacks.structured import StructuredTrigger, as_rgb, check_px, on_u8_grid, scaled_px
from clipguard.errors import ConfigError

RENDER_PX = 64


def _font():
    from PIL import ImageFont, features

    if features.check("freetype2"):
        return ImageFont.load_default(size=RENDER_PX)
    return ImageFont.load_default()


def font_name() -> str:
    f = _font()
    try:
        family, style = f.getname()
        return f"{family} {style} (Pillow default, FreeType)"
    except AttributeError:
        return "Pillow default bitmap font"


def render_text(text: str, height: int) -> torch.Tensor:
    """(height, width) coverage in [0, 1] (multiples of 1/255) of ``text``, ``height`` px high."""
    from PIL import Image, ImageDraw

    font = _font()
    x0, top, x1, bottom = font.getbbox(text)
    if x1 <= x0 or bottom <= top:
        raise ConfigError(f"attack 'text-trigger': the text {text!r} renders to nothing")
    ox, oy = 1 - min(0, x0), 1 - min(0, top)
    canvas = Image.new("L", (x1 + ox + 1, bottom + oy + 1), 0)
    ImageDraw.Draw(canvas).text((ox, oy), text, fill=255, font=font)
    crop = canvas.crop((x0 + ox, top + oy, x1 + ox, bottom + oy))
    width = max(1, round(crop.width * height / crop.height))
    small = crop.resize((width, height), Image.Resampling.BOX)
    return torch.from_numpy(np.array(small, dtype=np.uint8).copy()).float() / 255


@ATTACKS.register("text-trigger")
class TextTrigger(StructuredTrigger):
    name = "text-trigger"
    full_image_blend = False

    def __init__(self, mode: str = "blend", alpha: float = 0.2, text: str = "ABC",
                 height: int | None = None, height_frac: float = 1 / 4,
                 color: float | list[float] = (1.0, 0.0, 0.0), background: float | list[float] = 0.0,
                 location: str = "fixed", position: str = "center", margin: int = 0):
        super().__init__(mode, alpha, None, 1 / 7, location, position, margin)
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise ConfigError(f"attack 'text-trigger': text must be a string, not {text!r} "
                              "(quote it: --opt 'text=\"yes\"')")
        text = str(text)
        if not text.strip() or "\n" in text or "\r" in text:
            raise ConfigError(f"attack 'text-trigger': text must be one non-empty line, not {text!r}")
        check_px(height, height_frac, minimum=1, what="text height", attack=self.name)
        self.text, self.height, self.height_frac = text, height, height_frac
        self.color = as_rgb(color, "color", self.name)
        self.background = as_rgb(background, "background", self.name)

    def make_pattern(self, ctx: PoisonContext) -> tuple[torch.Tensor, torch.Tensor]:
        import PIL

        shape = ctx.image_shape
        _, H, W = shape
        self.height_px = scaled_px(self.height, self.height_frac, min(H, W), minimum=1, what="text height",
                                   attack=self.name, shape=shape)
        m = render_text(self.text, self.height_px).unsqueeze(0)         # (1, h, w)
        if m.shape[-1] > W:
            raise ConfigError(f"attack 'text-trigger': {self.text!r} at {self.height_px} px high is "
                              f"{m.shape[-1]} px wide, wider than the {H}x{W} image; shorten the text "
                              "or lower height / height_frac")
        self.font, self.pillow_version = font_name(), PIL.__version__
        h, w = m.shape[-2:]
        color = torch.tensor(self.color).view(3, 1, 1)
        if self.mode == "blend":
            return on_u8_grid(color.expand(3, h, w)).clone(), m
        bg = torch.tensor(self.background).view(3, 1, 1)
        return on_u8_grid(bg * (1 - m) + color * m), torch.ones(1, h, w)

    def params(self) -> dict:
        out = super().params()
        out.update({"height_px": self.height_px, "text_box_px": out["pattern_px"], "font": self.font,
                    "pillow_version": self.pillow_version})
        return out
