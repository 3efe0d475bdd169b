"""Our trainer's images/s against a minimal loop written directly with open_clip's ClipLoss.

Same model config, data, batch size, optimizer and seed, measured side by side in one run and
interleaved so background load hits both alike. Each contestant first runs once untimed on a few
batches (the process's first training loop pays for the allocator's growth and lazy
initialisation, whichever loop it is), and the order alternates from repeat to repeat (ours first
in odd repeats, the minimal loop first in even ones; with more contestants the order rotates).
Prints the ratio ours / minimal (target >= 1.0). With ``--trim-text`` our trainer also runs with
``trim_text: true`` (the text tower on the captions, not their padding; on by default on a GPU,
off on the CPU). With ``--with-clipping`` the minimal loop also runs with what open_clip's own
training loop does per step under ``--grad-clip-norm 1`` (our trainer's default): torch's
``clip_grad_norm_`` and the logit-scale clamp, so that the two loops do the same work.

    .venv/bin/python benchmarks/train_throughput.py --pairs 10000 --epochs 1 --repeats 2
    .venv/bin/python benchmarks/train_throughput.py --pairs 10000 --epochs 1 --repeats 3 --trim-text
    .venv/bin/python benchmarks/train_throughput.py --pairs 10000 --epochs 1 --repeats 4 --with-clipping
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from clipguard.data.csv_dataset import load_csv
from clipguard.data.fashion_mnist import materialise
from clipguard.models.factory import create_model, get_tokenizer
from clipguard.tensors import normalize
from clipguard.training.build import build_trainer
from clipguard.training.losses import MAX_LOGIT_SCALE
from clipguard.training.optim import make_optimizer
from clipguard.training.spec import resolve_spec
from clipguard.training.trainer import TrainConfig


def minimal_loop(data, model_name: str, epochs: int, batch: int, lr: float, seed: int,
                 grad_clip: float | None = None) -> tuple[float, float]:
    """The loop a user would write in 20 lines with open_clip: (loop-only, end-to-end) images/s.

    With ``grad_clip`` it also does what open_clip's own training loop does with
    ``--grad-clip-norm``: ``torch.nn.utils.clip_grad_norm_`` before each step, and the logit-scale
    clamp after it (open_clip's train.py clamps every step), the per-step work our trainer does."""
    t_start = time.perf_counter()
    model = create_model(model_name, seed=seed, trim_text=False)  # open_clip's own encode_text
    tokens = get_tokenizer(model_name)(data.captions)
    opt = make_optimizer(model, lr)
    loss_fn = open_clip.ClipLoss()
    g = torch.Generator().manual_seed(seed)
    steps = len(data) // batch
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            px = normalize(data.images[idx].float() / 255)
            img, txt, scale = model(px, tokens[idx])
            loss = loss_fn(img, txt, scale)
            opt.zero_grad()
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, norm_type=2.0)
            opt.step()
            if grad_clip is not None:
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    end = time.perf_counter()
    n = steps * batch * epochs
    return n / (end - t0), n / (end - t_start)


def ours(data, model_name: str, epochs: int, batch: int, lr: float, seed: int,
         trim_text: bool | None = None) -> tuple[float, float]:
    """(loop-only, end-to-end) images/s; end-to-end includes set-up and a checkpoint per epoch."""
    from clipguard.io import read_jsonl

    with tempfile.TemporaryDirectory() as d:
        spec = resolve_spec(train={"model": model_name, "epochs": epochs, "batch_size": batch, "lr": lr,
                                   "seed": seed, "device": "cpu", "quiet": True, "keep_checkpoints": 1,
                                   "trim_text": trim_text})
        t = build_trainer(spec, data, d)
        t0 = time.perf_counter()
        t.fit()
        end = time.perf_counter()
        loop_s = sum(r["seconds"] for r in read_jsonl(Path(d) / "results.jsonl"))
        n = t.ctx.steps_per_epoch * batch * epochs
        return n / loop_s, n / (end - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="train.csv (default: materialise Fashion-MNIST)")
    ap.add_argument("--pairs", type=int, default=10000)
    ap.add_argument("--model", default="cg-tiny")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--trim-text", action="store_true", help="also time our trainer with trim_text: true")
    ap.add_argument("--with-clipping", action="store_true",
                    help="also time the minimal loop with open_clip's --grad-clip-norm at our trainer's default "
                         "(1.0) and its logit-scale clamp: the per-step work our trainer does, like for like")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(args.data) if args.data else materialise(Path(tmp) / "fm", train_size=args.pairs,
                                                            test_size=10) / "train.csv"
        data = load_csv(csv, image_size=28 if args.model.startswith("cg-tiny") else None)
        data = data.subset(range(min(args.pairs, len(data))))
        warm = data.subset(range(min(len(data), 4 * args.batch_size)))
        ours(warm, args.model, 1, args.batch_size, 1e-3, 0)
        minimal_loop(warm, args.model, 1, args.batch_size, 1e-3, 0)
        a, b, c, k = [], [], [], []
        clip = TrainConfig().grad_clip
        runs = [(a, lambda r: ours(data, args.model, args.epochs, args.batch_size, 1e-3, r)),
                (b, lambda r: minimal_loop(data, args.model, args.epochs, args.batch_size, 1e-3, r))]
        if args.trim_text:
            runs.append((c, lambda r: ours(data, args.model, args.epochs, args.batch_size, 1e-3, r, trim_text=True)))
        if args.with_clipping:
            runs.append((k, lambda r: minimal_loop(data, args.model, args.epochs, args.batch_size, 1e-3, r,
                                                   grad_clip=clip)))
        for r in range(args.repeats):
            # a rotation: ours first in the first repeat, the minimal loop first in the second, ...
            for out, fit in runs[r % len(runs):] + runs[:r % len(runs)]:
                out.append(fit(r))
            line = (f"repeat {r + 1}: clipguard loop {a[-1][0]:.1f} / end-to-end {a[-1][1]:.1f} img/s, "
                    f"minimal open_clip loop {b[-1][0]:.1f} / {b[-1][1]:.1f} img/s")
            if args.trim_text:
                line += f", clipguard with trim_text {c[-1][0]:.1f} / {c[-1][1]:.1f} img/s"
            if args.with_clipping:
                line += f", minimal loop with clipping and clamp {k[-1][0]:.1f} / {k[-1][1]:.1f} img/s"
            print(line)
    print(f"\n{args.model}, {len(data)} pairs, batch {args.batch_size}, {args.epochs} epoch(s), "
          f"{torch.get_num_threads()} threads; medians of {args.repeats}")
    for i, what in enumerate(("training loop only", "end to end (set-up, tokenising, checkpoints)")):
        ma, mb = statistics.median(x[i] for x in a), statistics.median(x[i] for x in b)
        ratios = sorted(x[i] / y[i] for x, y in zip(a, b))
        print(f"{what}: clipguard {ma:.1f} img/s, minimal ClipLoss loop {mb:.1f} img/s, "
              f"ratio {ma / mb:.3f}; each repeat's own ratio: median {statistics.median(ratios):.3f}, "
              f"range {ratios[0]:.3f}-{ratios[-1]:.3f} (target >= 1.0)")
        if c:
            mc = statistics.median(x[i] for x in c)
            print(f"{what}: clipguard with trim_text {mc:.1f} img/s, ratio to the minimal loop {mc / mb:.3f}")
        if k:
            mk = statistics.median(x[i] for x in k)
            own = sorted(x[i] / y[i] for x, y in zip(a, k))
            print(f"{what}: minimal loop with clipping and clamp {mk:.1f} img/s, clipguard's ratio to it "
                  f"{ma / mk:.3f}; each repeat's own ratio: median {statistics.median(own):.3f}, "
                  f"range {own[0]:.3f}-{own[-1]:.3f}")


if __name__ == "__main__":
    main()
