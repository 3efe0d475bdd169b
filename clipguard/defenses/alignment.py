"""Is the model aligned yet? A defence that matches or splits pairs by the model's judgement gets
noise when the model has not left chance: RoCLIP's first pool epochs then gather every image on a
few captions, SafeCLIP's first split is a random draw (docs/results.md, MNIST). This module watches
the mean CLIP loss of the epoch before such a decision and warns, once per run, when it is still
near chance."""

from __future__ import annotations

import logging
import math

import torch

from clipguard.training.context import TrainContext
from clipguard.training.distributed import all_reduce_sum

log = logging.getLogger("clipguard")

# an epoch whose mean CLIP loss is above this share of chance (log of the global batch) has not
# taught the model to match images to captions
NEAR_CHANCE = 0.97


def chance_loss(ctx: TrainContext) -> float:
    """CLIP's loss at chance: the log of the global batch."""
    return math.log(ctx.batch_size * ctx.dist.world_size)


class ChanceMonitor:
    """The running mean of one epoch's CLIP loss, compared with chance when a decision follows."""

    def __init__(self) -> None:
        self.total, self.steps, self.warned = 0.0, 0, False

    def add(self, loss: float) -> None:
        self.total += loss
        self.steps += 1

    def reset(self) -> None:
        self.total, self.steps = 0.0, 0

    def global_ratio(self, ctx: TrainContext) -> float | None:
        """The mean loss since the last reset over every rank, as a share of chance (None without
        steps), without resetting it: the same answer on every rank, for a decision."""
        t = all_reduce_sum(torch.tensor([self.total, float(self.steps)], dtype=torch.float64,
                                        device=ctx.device), ctx.dist)
        if float(t[1]) == 0:
            return None
        return float(t[0] / t[1]) / chance_loss(ctx)

    def state(self) -> list[float]:
        return [self.total, float(self.steps)]

    def load(self, state: list[float]) -> None:
        self.total, self.steps = float(state[0]), int(state[1])

    def check(self, ctx: TrainContext, what: str, advice: str) -> float | None:
        """The mean loss since the last reset as a share of chance (None without steps); warns
        once per run, on the main rank, when it is above ``NEAR_CHANCE``. Resets the mean."""
        if not self.steps:
            return None
        mean = self.total / self.steps
        chance = chance_loss(ctx)
        self.reset()
        ratio = mean / chance
        if ratio > NEAR_CHANCE and not self.warned and ctx.dist.is_main:
            self.warned = True
            log.warning("%s follows an epoch whose CLIP loss (%.2f) is near chance (%.2f): %s",
                        what, mean, chance, advice)
        return round(ratio, 4)
