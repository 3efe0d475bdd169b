"""``clipguard finetune``: clean a (possibly poisoned) model with ft / cleanclip / cleanerclip / par.

The run starts from the checkpoint's weights only, with a fresh optimizer and schedule (the
reference code wrongly restored the pre-training optimizer state). ``--resume latest`` resumes
the fine-tuning run itself, from its own checkpoints.
"""

from __future__ import annotations

import argparse

from clipguard.commands.train import add_train_args, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a possibly poisoned model on clean data (ft, cleanclip, "
                       "cleanerclip, par)")
    add_train_args(p, finetune=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard.training.run import finetune_start

    weights, name = finetune_start(args.checkpoint, args.model)
    args.model = name
    last = run_training(args, stage="finetune", checkpoint=weights)
    shown = ", ".join(f"{k}={v}" for k, v in last.items() if k in ("epoch", "loss", "zeroshot_top1"))
    print(f"finished: {args.out} ({shown}); started from {weights}")
    return 0
