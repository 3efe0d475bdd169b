"""Helpers the strategy tests share: a trainer set up for a strategy, and a batch of given rows."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from clipguard.training.context import Batch, to_pixels
from clipguard.training.trainer import TrainConfig, Trainer


def set_up(cfg: TrainConfig, data, strategy, tmp_path: Path) -> Trainer:
    """A trainer bound to ``strategy`` and ready to step, without training."""
    t = Trainer(cfg, data, tmp_path, strategy=strategy)
    t.setup()
    return t


def batch_of(t: Trainer, idx, seed: int) -> Batch:
    """The batch of rows ``idx`` of ``t``'s data as a step sees them, its random draws seeded by ``seed``."""
    idx = torch.as_tensor(idx)
    return Batch(pixels=to_pixels(t.data.images[idx], torch.device("cpu")), tokens=t.tokens[idx],
                 captions=[t.data.captions[i] for i in idx.tolist()], indices=idx,
                 generator=torch.Generator().manual_seed(seed), rng=random.Random(seed))
