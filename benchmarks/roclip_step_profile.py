"""Where a RoCLIP pool step spends the time a plain step does not.

Times, on the same batches and model, one RoCLIP pool step (forward + backward), one plain step
(augmented views, CLIP loss) and the parts a pool step adds: the no-gradient encode of the pair's
own captions that the ``keep_own`` test and the pool need, picking and ranking the pooled
captions, the diagnostics record and the pool update. Each figure is the mean over ``--steps``
steps after one untimed step; the parts are timed on their own, so they need not add up to the
difference of the two steps.

    .venv/bin/python benchmarks/roclip_step_profile.py --pairs 2000 --model cg-nano
    .venv/bin/python benchmarks/roclip_step_profile.py --data path/train.csv --batch-size 256
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from clipguard import defenses
from clipguard.data.csv_dataset import load_csv
from clipguard.training.context import Batch, to_pixels
from clipguard.training.trainer import TrainConfig, Trainer


def mean_ms(fn: Callable[[int], object], steps: int) -> float:
    """Mean wall time of ``fn(i)`` for i = 1..steps in milliseconds, after an untimed ``fn(0)``."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        fn(i)
    return 1000 * (time.perf_counter() - t0) / steps


def fixed_batch(trainer: Trainer, batch_size: int, i: int) -> Batch:
    """The i-th batch of ``batch_size`` consecutive pairs (wrapping round), seeded by ``i``: the same
    batches for every variant a profile times."""
    data, ctx = trainer.data, trainer.ctx
    idx = torch.arange(batch_size * i, batch_size * (i + 1)) % len(data)
    return Batch(pixels=to_pixels(data.images[idx], ctx.device), tokens=trainer.tokens[idx],
                 captions=[data.captions[j] for j in idx.tolist()], indices=idx,
                 generator=torch.Generator().manual_seed(i), rng=random.Random(i))


def main(argv: list[str] | None = None) -> None:
    from defense_overhead import training_csv  # the sibling script (benchmarks/ is sys.path[0])

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="training CSV (default: Fashion-MNIST, materialised)")
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--model", default="cg-nano")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = load_csv(training_csv(args.data, tmp, args.pairs, args.seed), limit=args.pairs)
        trainer = Trainer(TrainConfig(model=args.model, epochs=1, batch_size=args.batch_size, seed=args.seed,
                                      device="cpu", quiet=True),
                          data, tmp / "run", strategy=defenses.build("roclip", {"match_every": 1}))
        trainer.setup()
        s, ctx, b = trainer.strategy, trainer.ctx, args.batch_size
        s.on_epoch_start(0)  # fills the pool

        def batch(i: int) -> Batch:
            return fixed_batch(trainer, b, i)

        def step(pool: bool) -> Callable[[int], None]:
            def run(i: int) -> None:
                s.opt.match_every = 1 if pool else 1_000_000  # epoch 0: a pool epoch only at K = 1
                loss, _ = s.loss(batch(i))
                loss.backward()
                trainer.model.zero_grad(set_to_none=True)
                s.opt.match_every = 1
            return run

        feats = torch.nn.functional.normalize(torch.randn(b, s._pool.bank.shape[1]), dim=-1)

        def own_captions(i: int) -> None:
            bt = batch(i)
            ctx.encode_views(tokens=ctx.tokenize(s._texts(bt.captions, bt.rng)))

        def captions_only(i: int) -> None:
            bt = batch(i)
            ctx.tokenize(s._texts(bt.captions, bt.rng))

        def pick(i: int) -> None:
            s._pick_rank(feats, s._pick(feats))

        def record(i: int) -> None:
            rank = s._pick_rank(feats, s._pick(feats))
            s._record(torch.arange(b), rank, rank < 5, rank < 5)

        def push(i: int) -> None:
            s._push(feats, trainer.tokens[:b])

        rows = [("pool step", step(True)), ("plain step", step(False)),
                ("own captions: EDA + tokenise + no-grad encode", own_captions),
                ("own captions: EDA + tokenise only", captions_only),
                ("pick + rank", pick), ("diagnostics record", record), ("pool update", push)]
        for name, fn in rows:
            print(f"{name:48s} {mean_ms(fn, args.steps):8.2f} ms")


if __name__ == "__main__":
    main()
