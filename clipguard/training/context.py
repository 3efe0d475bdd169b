"""What a strategy sees of the training run: the model, the data, and one forward pass per step."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.evaluation.features import encode_images, encode_tokens
from clipguard.tensors import normalize, to_pixels  # noqa: F401  (re-exported for strategies)
from clipguard.training.distributed import DistInfo


def step_seed(*parts: Any) -> int:
    """A seed that depends only on (seed, epoch, step, rank, ...): resuming replays it exactly."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:7], "little")


class StepModule(torch.nn.Module):
    """What DDP wraps: the open_clip model, called either as open_clip calls it or with a *plan*,
    a function of the model that encodes in stages (images first, then the captions the images
    chose). A plan runs inside the one wrapped forward of the step, so DDP still sees one forward
    and one backward, and a strategy never needs a probe forward to decide what to encode."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                plan: Callable[[torch.nn.Module], Any] | None = None) -> Any:
        if plan is not None:
            return plan(self.clip)
        return self.clip(image, text)


@dataclass
class Batch:
    """One micro-batch: pixels in [0,1] on the device, tokens, raw captions and dataset indices."""

    pixels: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]
    indices: torch.Tensor
    generator: torch.Generator
    rng: random.Random


@dataclass
class TrainContext:
    model: torch.nn.Module          # possibly DDP-wrapped: call it once per step via forward()
    raw_model: torch.nn.Module      # the open_clip CLIP inside
    data: ImageCaptionData
    tokens: torch.Tensor            # pre-tokenised captions of ``data``
    tokenizer: Callable[[list[str]], torch.Tensor]
    dist: DistInfo
    device: torch.device
    epochs: int
    steps_per_epoch: int
    batch_size: int
    seed: int
    base_lr: float
    autocast: Callable[[], Any] = field(default=lambda: torch.autocast("cpu", enabled=False))
    channels_last: bool = False     # the model's weights are NHWC: feed its pixels the same way
    step_module: torch.nn.Module | None = None  # the (possibly DDP-wrapped) StepModule, for forward_plan
    epoch: int = 0
    step: int = 0

    def forward(self, pixels: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                             torch.Tensor]:
        """The one forward pass of a step; concatenate every view into it (DDP needs one call).

        Returns L2-normalised image features, text features (either None when not given) and the
        clamped logit scale exp(s).
        """
        x = self.prepare_pixels(pixels) if pixels is not None else None
        with self.autocast():
            out = self.model(x, tokens)
        if isinstance(out, dict):
            img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            img, txt, scale = out[0], out[1], out[2]
        img = img.float() if img is not None else None
        txt = txt.float() if txt is not None else None
        return img, txt, scale.float()

    def forward_plan(self, plan: Callable[[torch.nn.Module], Any]) -> Any:
        """The step's one forward as a staged ``plan(model)`` (see ``StepModule``); never compiled.

        The plan receives the plain open_clip model and returns what the loss needs; pixels it
        encodes must go through ``prepare_pixels`` and it runs under the step's autocast."""
        module = self.step_module if self.step_module is not None else StepModule(self.raw_model)
        with self.autocast():
            return module(plan=plan)

    def prepare_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0,1] pixels as the model takes them (normalised, in the weights' memory format)."""
        x = normalize(pixels)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def encode_views(self, pixels: torch.Tensor | None = None, tokens: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Features of extra views that need no gradient (targets of an in-modal loss, a pool's
        entries, a probe), in the training mode and precision of the step's forward but outside
        it: no backward pass, and DDP never sees them. Either modality may be left out (None)."""
        img = txt = None
        with self.autocast():
            if pixels is not None:
                img = self.raw_model.encode_image(self.prepare_pixels(pixels), normalize=True).float()
            if tokens is not None:
                txt = self.raw_model.encode_text(tokens, normalize=True).float()
        return img, txt

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions).to(self.device)

    @torch.no_grad()
    def encode_dataset(self, batch_size: int = 512, indices: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of clean (non-augmented) pairs, for this rank's shard or given indices."""
        idx = indices if indices is not None else torch.arange(len(self.data))
        img = encode_images(self.raw_model, self.data.images, self.device, batch_size, indices=idx)
        txt = encode_tokens(self.raw_model, self.tokens[idx], self.device, batch_size)
        return img, txt
