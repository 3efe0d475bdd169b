"""A one-process CPU training context and full batches of it, for the loss-level strategy tests."""

from __future__ import annotations

import random

import torch

from clipguard.models.factory import create_model, get_tokenizer
from clipguard.training.context import Batch, TrainContext, to_pixels
from clipguard.training.distributed import DistInfo


def make_ctx(data, seed: int = 0) -> TrainContext:
    model = create_model("cg-tiny", seed=seed)
    tok = get_tokenizer("cg-tiny")
    return TrainContext(model=model, raw_model=model, data=data, tokens=tok(data.captions), tokenizer=tok,
                        dist=DistInfo(), device=torch.device("cpu"), epochs=1, steps_per_epoch=1,
                        batch_size=len(data), seed=seed, base_lr=1e-3)


def make_batch(ctx: TrainContext, seed: int, idx=None) -> Batch:
    """The rows ``idx`` (all by default) as one batch, its generator and rng seeded with ``seed``."""
    idx = torch.arange(len(ctx.data)) if idx is None else idx
    return Batch(pixels=to_pixels(ctx.data.images[idx], ctx.device), tokens=ctx.tokens[idx],
                 captions=[ctx.data.captions[i] for i in idx.tolist()], indices=idx,
                 generator=torch.Generator().manual_seed(seed), rng=random.Random(seed))
