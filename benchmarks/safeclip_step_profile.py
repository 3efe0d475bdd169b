"""Where a SafeCLIP mixed epoch spends the time a plain CLIP epoch does not.

Times, on the same batches and model, a plain CLIP step (forward + backward on the pairs as they
are), a SafeCLIP mixed step with the library's defaults at a given share of risky pairs, and the
parts a mixed step adds: the SimCLR views of the risky rows, their EDA captions and tokenising,
the forward and backward of the batch plus the risky rows' second views under a plain CLIP loss
(the compute alone), and the two nearest-neighbour losses; the mixed step also with each cheaper
option (``risky_loss`` none or one-view, ``update_features: steps``). Then one split update (the
epoch-start re-scoring, the density and repeated-image vetoes) in plain-step units and in
plain-epoch units, and the same update with ``update_features: steps``, the safe pairs' features
kept from the steps before it.
Each step figure is the mean over ``--steps`` steps after one untimed step; the parts are timed
on their own, so they need not add up to the difference of the two steps.

    .venv/bin/python benchmarks/safeclip_step_profile.py --pairs 4000 --model cg-nano
    .venv/bin/python benchmarks/safeclip_step_profile.py --risky 0.2 --trim-text
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from clipguard import defenses
from clipguard.data.csv_dataset import load_csv
from clipguard.defenses.nn_pool import nn_contrastive_loss
from clipguard.training.context import Batch
from clipguard.training.losses import clip_loss
from clipguard.training.trainer import TrainConfig, Trainer


def main(argv: list[str] | None = None) -> None:
    from defense_overhead import training_csv  # the sibling script (benchmarks/ is sys.path[0])
    from roclip_step_profile import fixed_batch, mean_ms

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="training CSV (default: Fashion-MNIST, materialised)")
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--model", default="cg-nano")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--risky", type=float, default=0.35,
                   help="share of a batch outside the safe set (about 0.35 under the defaults)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trim-text", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.risky <= 1.0:
        p.error("--risky must be in [0, 1]")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = load_csv(training_csv(args.data, tmp, args.pairs, args.seed), limit=args.pairs)
        epochs = 8
        strategy = defenses.build("safeclip")
        trainer = Trainer(TrainConfig(model=args.model, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
                                      device="cpu", quiet=True, trim_text=args.trim_text),
                          data, tmp / "run", strategy=strategy)
        trainer.setup()
        s, ctx, b, n = strategy, trainer.ctx, args.batch_size, len(data)
        first = next(e for e in range(epochs) if s.phase(e) == "mixed")
        ctx.epoch = first
        t0 = time.perf_counter()
        s.on_epoch_start(first)  # the first split: every pair scored, the mixture fitted
        first_ms = 1000 * (time.perf_counter() - t0)
        g = torch.Generator().manual_seed(args.seed)
        s._safe = torch.rand(n, generator=g) >= args.risky  # the share of risky pairs asked for

        def batch(i: int) -> Batch:
            return fixed_batch(trainer, b, i)

        def risky_rows(bt: Batch) -> torch.Tensor:
            return torch.nonzero(~s._safe[bt.indices]).flatten()

        def plain(i: int) -> None:
            bt = batch(i)
            img, txt, scale = ctx.forward(bt.pixels, bt.tokens)
            clip_loss(img, txt, scale, ctx.dist).backward()
            trainer.model.zero_grad(set_to_none=True)

        def mixed(i: int) -> None:
            loss, _ = s.loss(batch(i))
            loss.backward()
            trainer.model.zero_grad(set_to_none=True)

        @contextmanager
        def options(**changes: object) -> Iterator[None]:
            # the same strategy with other options (those a mixed step or an update reads); restored after
            kept = s.opt
            s.opt = replace(kept, **changes)
            try:
                yield
            finally:
                s.opt = kept

        feats = torch.zeros(n, 2 * s._img_pool.bank.shape[1], dtype=torch.float16)

        def mixed_with(**changes: object) -> Callable[[int], None]:
            def step(i: int) -> None:
                keeps = changes.get("update_features") == "steps"  # the step keeps the safe rows' features
                s._step_feats, s._step_fresh = (feats, torch.zeros(n, dtype=torch.bool)) if keeps else (None, None)
                try:
                    with options(**changes):
                        mixed(i)
                finally:
                    s._step_feats = s._step_fresh = None
            return step

        def image_views(i: int) -> None:
            bt = batch(i)
            r = risky_rows(bt)
            s._views.images(bt.pixels, bt.generator, rows=r)
            s._views.images(bt.pixels[r], bt.generator)

        def text_views(i: int) -> None:
            bt = batch(i)
            r = risky_rows(bt).tolist()
            ctx.tokenize(s._views.texts(bt.captions, bt.rng) + s._views.texts([bt.captions[j] for j in r], bt.rng))

        def compute(i: int) -> None:
            bt = batch(i)
            r = risky_rows(bt)
            img, txt, scale = ctx.forward(torch.cat([bt.pixels, bt.pixels[r]]), torch.cat([bt.tokens, bt.tokens[r]]))
            clip_loss(img, txt, scale, ctx.dist).backward()
            trainer.model.zero_grad(set_to_none=True)

        d = s._img_pool.bank.shape[1]

        def nn_losses(i: int) -> None:
            f1, f2 = (torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_() for _ in range(2))
            risky = torch.rand(b) < args.risky
            (nn_contrastive_loss(f1, f2, s._img_pool, risky, s.opt.temperature, ctx.dist)
             + nn_contrastive_loss(f1, f2, s._txt_pool, risky, s.opt.temperature, ctx.dist)).backward()

        rows = [("plain CLIP step", plain), ("SafeCLIP mixed step", mixed),
                ("SafeCLIP mixed step, risky_loss: none", mixed_with(risky_loss="none")),
                ("SafeCLIP mixed step, risky_loss: one-view", mixed_with(risky_loss="one-view")),
                ("SafeCLIP mixed step, update_features: steps", mixed_with(update_features="steps")),
                ("  risky rows' image views (both)", image_views),
                ("  EDA captions + tokenise (batch + risky)", text_views),
                ("  forward + backward of batch + risky views", compute),
                ("  nearest-neighbour losses (image, text)", nn_losses)]
        times = {name: mean_ms(fn, args.steps) for name, fn in rows}
        ref = times["plain CLIP step"]
        spe = n // b
        ctx.epoch = first + 1
        t0 = time.perf_counter()
        s.on_epoch_start(first + 1)  # a later split: the top pairs re-scored, the vetoes
        update_ms = 1000 * (time.perf_counter() - t0)
        # the same update from the steps' features: as after a mixed epoch, every safe pair's
        # features were kept by its step (here: encoded now, untimed), the others' are older
        img, txt = ctx.encode_dataset(indices=torch.arange(n))
        feats.copy_(torch.cat([img.cpu(), txt.cpu()], dim=1).to(feats.dtype))
        s._step_feats, s._step_fresh = feats, s._safe.clone()
        ctx.epoch = first + 2
        with options(update_features="steps"):
            t0 = time.perf_counter()
            rec = s.on_epoch_start(first + 2)
            steps_ms = 1000 * (time.perf_counter() - t0)
        print(f"{args.model}, batch {b}, {n} pairs ({spe} steps an epoch), risky share {args.risky:.2f}, "
              f"trim_text {args.trim_text}, {torch.get_num_threads()} threads")
        print(f"{'':48s} {'ms':>8s} {'plain steps':>12s}")
        for name, ms in times.items():
            print(f"{name:48s} {ms:8.2f} {ms / ref:12.2f}")
        for name, ms in (("first split (all pairs + mixture)", first_ms), ("one split update", update_ms),
                         ("one split update, update_features: steps", steps_ms)):
            print(f"{name:48s} {ms:8.1f} {ms / ref:12.2f}   ({ms / ref / spe:.2f} plain epochs)")
        print(f"(that update re-used {rec['reused_features']} of its {rec['evaluated_pairs']} pairs' features)")


if __name__ == "__main__":
    main()
