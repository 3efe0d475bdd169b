"""Where a RoCLIP pool step spends the time a plain step does not.

Times, on the same batches and model, one RoCLIP pool step (forward + backward) with the defaults
(``unmatched: drop``: one encode of the batch's own captions, with gradient, serves the pool, the
agreement test and the loss) and with ``unmatched: pooled`` (the pairs that do not keep their own
caption train on their picks, so the own captions are first encoded without gradient), one plain
step after a pool step as the defaults train it (``plain_views``: the pairs as given) and on
augmented views as the paper (the views a pool step trains on), and the parts a pool step adds:
that no-gradient encode, picking and ranking the pooled captions, the diagnostics record and the
pool update; then, with the pattern veto (a default), each of its parts, timed once. Each step
figure is the mean over ``--steps`` steps after one untimed round, the rows taking turns step by
step; the parts are timed on their own, so they need not add up to the difference of the steps.
The pool steps run with the alignment gate open (as after the model has left chance).

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


def interleaved_ms(fns: list[Callable[[int], object]], steps: int) -> list[float]:
    """Mean wall time of each ``fn(i)`` for i = 1..steps in milliseconds, the functions taking turns
    step by step (after one untimed round), so a machine that slows down mid-run slows them alike."""
    for fn in fns:
        fn(0)
    total = [0.0] * len(fns)
    for i in range(1, steps + 1):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(i)
            total[k] += time.perf_counter() - t0
    return [1000 * t / steps for t in total]


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
        s._aligned_at = 0  # the gate open: epoch 0 is a pool epoch at K = 1
        s.on_epoch_start(0)  # fills the pool

        def batch(i: int) -> Batch:
            return fixed_batch(trainer, b, i)

        unmatched = s.opt.unmatched

        views = s.opt.plain_views

        def step(pool: bool, how: str = unmatched, plain_views: str = views) -> Callable[[int], None]:
            def run(i: int) -> None:
                s.opt.match_every = 1 if pool else 1_000_000
                s.opt.unmatched, s.opt.plain_views = how, plain_views
                if s.is_pool_epoch(0) != pool:
                    raise RuntimeError("the profile's step is not the kind it times")
                loss, _ = s.loss(batch(i))
                loss.backward()
                trainer.model.zero_grad(set_to_none=True)
                s.opt.match_every, s.opt.unmatched, s.opt.plain_views = 1, unmatched, views
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
            s._record(torch.arange(b), rank, rank < 5, rank < 5, feats)

        def push(i: int) -> None:
            s._push(feats, trainer.tokens[:b])

        rows = [(f"pool step (unmatched: {unmatched})", step(True)),
                ("pool step (unmatched: pooled)", step(True, "pooled")),
                (f"plain step (plain_views: {views})", step(False)),
                ("plain step (plain_views: augmented)", step(False, plain_views="augmented")),
                ("own captions: EDA + tokenise + no-grad encode", own_captions),
                ("own captions: EDA + tokenise only", captions_only),
                ("pick + rank", pick), ("diagnostics record", record), ("pool update", push)]
        for (name, _), ms in zip(rows, interleaved_ms([fn for _, fn in rows], args.steps)):
            print(f"{name:48s} {ms:8.2f} ms")
        if s._pattern is not None:
            for name, ms in pattern_veto_ms(s, ctx, args.seed):
                print(f"{name:48s} {ms:8.2f} ms")


def pattern_veto_ms(s, ctx, seed: int) -> list[tuple[str, float]]:
    """The pattern veto's parts (``pattern_z``), each timed once: once per run, the training images'
    high-pass and their shrunk inverse covariance; at the end of every pool epoch, encoding every
    caption, the caption groups' k-means and the pattern scores, then the whole veto as it runs (which,
    with ``pattern_text: pool-epoch``, encodes nothing)."""
    from clipguard.data.signatures import pixel_residuals
    from clipguard.detection.detectors.pattern import PatternOptions, pattern_scores, shrunk_precision
    from clipguard.detection.detectors.spectral import caption_groups
    from clipguard.evaluation.features import encode_tokens

    veto = s._pattern
    out, t0 = [], time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        out.append((name, 1000 * (time.perf_counter() - t0)))
        t0 = time.perf_counter()

    residuals = pixel_residuals(ctx.data.images)
    lap("veto, once a run: high-passed pixels")
    precision = shrunk_precision(residuals, seed=veto.seed)
    lap("veto, once a run: their shrunk inverse covariance")
    text = encode_tokens(ctx.raw_model, ctx.tokens, ctx.device).numpy()
    lap("veto, each pool epoch: encode every caption")
    groups = caption_groups(text, veto.clusters, veto.seed, PatternOptions.max_points)
    lap("veto, each pool epoch: caption groups (k-means)")
    suspicion = torch.rand(len(text), generator=torch.Generator().manual_seed(seed))
    pattern_scores(residuals, groups, suspicion.double().numpy(), veto.share, PatternOptions.min_group, precision)
    lap("veto, each pool epoch: pattern scores")
    veto._residuals, veto._precision = residuals, precision  # as after a run's first veto
    # with pattern_text: pool-epoch the pool steps hand the veto their caption embeddings
    stored = torch.from_numpy(text) if s.opt.pattern_text == "pool-epoch" else None
    t0 = time.perf_counter()
    veto.vetoed(ctx, suspicion, text=stored)
    lap("veto, each pool epoch: all of it")
    return out


if __name__ == "__main__":
    main()
