"""The strategy interface: a defence is a loss plus epoch hooks, never a second training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from clipguard.options import Options
from clipguard.training.context import Batch, TrainContext
from clipguard.training.losses import clip_loss
from clipguard.training.schedule import Schedule, warmup_cosine


class Strategy:
    """Base class. Subclasses override ``loss`` and, when they need them, the hooks.

    Rules that keep the trainer honest: one ``ctx.forward`` per step (concatenate views),
    randomness only from ``batch.generator`` / ``batch.rng`` (seeded by epoch and step, so
    resume is exact), and state that must survive a resume in ``state_tensors``/``state_json``.
    """

    name = "base"
    options_class: ClassVar[type[Options]]
    # Under DDP: whether every step gives every trainable parameter a gradient. A strategy whose
    # steps can leave one out (SafeCLIP's all-risky batch never reaches the logit scale) keeps
    # False, and DDP then searches each step's graph for unused parameters; True spares that search
    # (and PyTorch's warning that it found none) where the model has nothing else to train
    # (training.trainer.every_parameter_trains).
    uses_every_parameter: ClassVar[bool] = False

    def __init__(self, options: Options | None = None):
        cls = self.options_class
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise TypeError(f"{type(self).__name__} takes {cls.__name__}, got {type(options).__name__}")
        self.opt = options

    def bind(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    def schedule(self, ctx: TrainContext, warmup: int, min_lr: float) -> Schedule:
        """The lr plan over the whole run; multi-phase defences return several segments."""
        return warmup_cosine(ctx.epochs * ctx.steps_per_epoch, ctx.base_lr, warmup, min_lr)

    def describe_schedule(self, lr: float, warmup: int) -> str:
        """The learning rate in words, as ``schedule`` will run it (printed before a run starts)."""
        return f"lr {lr:g}, warm-up {warmup}"

    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        return {}

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_json(self) -> dict[str, Any]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    def config(self) -> dict[str, Any]:
        """Every hyper-parameter, written to params.json."""
        return self.opt.to_dict()


class PairSelector:
    """A strategy that splits the data into pairs it trusts and pairs it does not (SafeCLIP).

    Diagnostics read these two and nothing else; the strategy never sees which pairs are poisoned.
    """

    def pair_scores(self) -> torch.Tensor | None:
        """Per-pair 'looks clean' scores of the current epoch (higher = more trusted), or None."""
        return None

    def selected(self) -> torch.Tensor | None:
        """Boolean mask of the pairs trained with the CLIP loss this epoch (the safe set), or None."""
        return None

    def flagged(self) -> torch.Tensor | None:
        """Boolean mask of the pairs an image-side veto flagged this epoch (SafeCLIP's pattern
        veto), or None."""
        return None


@dataclass
class ClipOptions(Options):
    """Plain CLIP has no options of its own (train settings live in TrainConfig)."""

    kind: ClassVar[str] = "plain CLIP (defense 'none' / 'ft')"


class ClipStrategy(Strategy):
    """Plain CLIP: symmetric contrastive loss on every pair."""

    name = "none"
    options_class = ClipOptions
    uses_every_parameter = True

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        img, txt, scale = self.ctx.forward(batch.pixels, batch.tokens)
        loss = clip_loss(img, txt, scale, self.ctx.dist)
        return loss, {"clip_loss": float(loss.detach())}
