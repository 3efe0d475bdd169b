"""Learning-rate schedules built from segments, so multi-phase defences index them correctly.

The reference SafeCLIP code indexed its cosine by the wrong step, so the lr fell to zero and
rose again. Here a schedule is a list of segments laid end to end; ``lr_at(step)`` is a pure
function of the global optimiser step, which also makes resuming exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    steps: int
    peak_lr: float
    warmup: int = 0
    final_lr: float | None = None  # None: constant at peak_lr; else cosine from peak to final
    # None: the warm-up rises from zero (peak_lr * (s + 1) / warmup); else it goes linearly from
    # start_lr at step 0 to peak_lr at step warmup, up or down (PAR's authors start 10x above it)
    start_lr: float | None = None

    def lr(self, s: int) -> float:
        if self.warmup > 0 and s < self.warmup:
            if self.start_lr is not None:
                return self.start_lr + (self.peak_lr - self.start_lr) * s / self.warmup
            return self.peak_lr * (s + 1) / self.warmup
        if self.final_lr is None:
            return self.peak_lr
        span = self.steps - self.warmup - 1
        progress = 1.0 if span <= 0 else min(1.0, (s - self.warmup) / span)
        return self.final_lr + 0.5 * (self.peak_lr - self.final_lr) * (1 + math.cos(math.pi * progress))


class Schedule:
    def __init__(self, segments: list[Segment]):
        if not segments:
            raise ValueError("a schedule needs at least one segment")
        self.segments = segments
        self.total_steps = sum(s.steps for s in segments)

    def lr_at(self, step: int) -> float:
        for seg in self.segments:
            if step < seg.steps:
                return seg.lr(step)
            step -= seg.steps
        last = self.segments[-1]
        return last.lr(last.steps - 1)


def warmup_cosine(total_steps: int, peak_lr: float, warmup: int, min_lr: float = 0.0,
                  start_lr: float | None = None) -> Schedule:
    """Linear warm-up to ``peak_lr`` (from zero, or from ``start_lr``) then cosine that reaches
    ``min_lr`` exactly at the last step."""
    warmup = min(warmup, max(0, total_steps - 1))
    return Schedule([Segment(total_steps, peak_lr, warmup, min_lr, start_lr)])
