"""CleanCLIP (Bansal et al., ICCV 2023): CLIP loss plus in-modal self-supervision.

Why it helps: a backdoor is a spurious image-trigger -> target-text link. Aligning each image
with its own augmented view and each caption with its own EDA view (independently of the other
modality) re-organises each tower's space around clean content and weakens that link.

loss = lambda1 * CLIP(I, T) + lambda2 * 1/2 [InfoNCE(aug I -> I) + InfoNCE(aug T -> T)]

The in-modal InfoNCE uses in-batch negatives and, by default, the model's logit scale as
CleanCLIP's reference code does. Views are drawn fresh every step from the step-seeded
``batch.generator`` / ``batch.rng`` (a known reference bug computed EDA once). Originals and
views go through ONE forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from clipguard.data.augment import Views
from clipguard.defenses import DEFENSES
from clipguard.options import Options, require
from clipguard.training.context import Batch
from clipguard.training.losses import clip_loss, info_nce
from clipguard.training.strategy import Strategy


@dataclass
class CleanClipOptions(Options):
    """CleanCLIP's loss weights and views; the defaults are the paper's (lambda1 = lambda2 = 1)."""

    kind: ClassVar[str] = "defense 'cleanclip'"
    lambda1: float = 1.0              # weight of the CLIP loss
    lambda2: float = 1.0              # weight of the in-modal loss (0: plain CLIP)
    inmodal_temperature: float | None = None  # None: the model's logit scale, as the reference code
    crop_scale_min: float = 0.08
    eda_alpha: float = 0.1
    image_views: bool = True
    text_views: bool = True

    def validate(self) -> None:
        require(self.lambda1 >= 0 and self.lambda2 >= 0, f"lambda1 and lambda2 must be >= 0, got "
                f"{self.lambda1}, {self.lambda2}")
        require(self.inmodal_temperature is None or self.inmodal_temperature > 0,
                "inmodal_temperature must be > 0 (or None: the model's logit scale)")
        require(0.0 < self.crop_scale_min <= 1.0, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        require(0.0 <= self.eda_alpha <= 1.0, f"eda_alpha must be in [0, 1], got {self.eda_alpha}")


@DEFENSES.register("cleanclip")
class CleanClip(Strategy):
    """lambda1 * CLIP + lambda2 * in-modal; lambda2 = 0 is exactly plain CLIP."""

    name = "cleanclip"
    options_class = CleanClipOptions

    def __init__(self, options: CleanClipOptions | None = None) -> None:
        super().__init__(options)
        o = self.opt
        self._views_of = Views(crop_scale_min=o.crop_scale_min, eda_alpha=o.eda_alpha, eda_p_delete=o.eda_alpha)

    # ---- pieces shared with CleanerCLIP ---------------------------------------------------
    def _views(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Fresh augmented pixels and EDA tokens for this step (None where switched off)."""
        if self.opt.lambda2 == 0:
            return None, None
        pix = tok = None
        if self.opt.image_views:
            pix = self._views_of.images(batch.pixels, batch.generator)
        if self.opt.text_views:
            tok = self.ctx.tokenize(self._views_of.texts(batch.captions, batch.rng))
        return pix, tok

    def _inmodal(self, img: torch.Tensor, img_aug: torch.Tensor | None, txt: torch.Tensor,
                 txt_aug: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
        temp = self.opt.inmodal_temperature if self.opt.inmodal_temperature is not None else 1.0 / scale
        terms = []
        if img_aug is not None:
            terms.append(info_nce(img_aug, img, temp, self.ctx.dist))
        if txt_aug is not None:
            terms.append(info_nce(txt_aug, txt, temp, self.ctx.dist))
        if not terms:
            return img.sum() * 0.0
        return sum(terms) / len(terms)

    def _forward(self, batch: Batch, extra_tokens: list[torch.Tensor] | None = None):
        """One forward for originals, their views and any extra captions.

        Returns (img, img_aug, txt, txt_aug, extra_txt, scale); absent parts are None.
        """
        pix_aug, tok_aug = self._views(batch)
        b = batch.pixels.shape[0]
        pixels = batch.pixels if pix_aug is None else torch.cat([batch.pixels, pix_aug])
        tok_parts = [batch.tokens] + ([tok_aug] if tok_aug is not None else []) + list(extra_tokens or [])
        tokens = torch.cat(tok_parts) if len(tok_parts) > 1 else batch.tokens
        img_all, txt_all, scale = self.ctx.forward(pixels, tokens)
        img, img_aug = img_all[:b], (img_all[b:] if pix_aug is not None else None)
        txt = txt_all[:b]
        at = b
        txt_aug = None
        if tok_aug is not None:
            txt_aug, at = txt_all[at:at + b], at + b
        extra = txt_all[at:]
        return img, img_aug, txt, txt_aug, extra, scale

    def _clip_and_inmodal(self, img, img_aug, txt, txt_aug, scale) -> tuple[torch.Tensor, dict[str, Any]]:
        """lambda1 * CLIP + lambda2 * in-modal, shared with CleanerCLIP, which adds L_fc on top."""
        l_clip = clip_loss(img, txt, scale, self.ctx.dist)
        logs: dict[str, Any] = {"clip_loss": float(l_clip.detach())}
        total = self.opt.lambda1 * l_clip
        if self.opt.lambda2 > 0:
            l_in = self._inmodal(img, img_aug, txt, txt_aug, scale)
            total = total + self.opt.lambda2 * l_in
            logs["inmodal_loss"] = float(l_in.detach())
        return total, logs

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        img, img_aug, txt, txt_aug, _, scale = self._forward(batch)
        return self._clip_and_inmodal(img, img_aug, txt, txt_aug, scale)
