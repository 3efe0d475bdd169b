"""``clipguard finetune``: clean a (possibly poisoned) model with ft / cleanclip / cleanerclip / par.

The run starts from the checkpoint's weights only, with a fresh optimizer and schedule (the
reference code wrongly restored the pre-training optimizer state). ``--resume latest`` resumes
the fine-tuning run itself, from its own checkpoints.
"""

from __future__ import annotations

import argparse
import sys

from clipguard.commands.train import add_train_args, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a possibly poisoned model on clean data (ft, cleanclip, "
                       "cleanerclip, par)")
    add_train_args(p, finetune=True)
    p.add_argument("--lr-search", metavar="LR,LR,...",
                   help="choose the learning rate by the defender's rule: one run per rate, the one that removes most of "
                        "your canaries (--select) while its zero-shot on --eval-data stays within --budget points of "
                        "the start (docs/finetuning.md#choosing-the-learning-rate-on-your-own-model)")
    p.add_argument("--budget", type=float, default=3.0,
                   help="zero-shot points the fine-tuning may cost on --eval-data, for --lr-search (default 3)")
    p.add_argument("--select", choices=["canary", "drift"], default="canary",
                   help="how --lr-search ranks the rates within the budget: canary (default: plant two backdoors of "
                        "your own into a copy of the model and keep the rate that removes most of them; twice the "
                        "runs; docs/finetuning.md#canaries) or drift (how far the clean images moved)")
    p.add_argument("--canary-lr", type=float, default=None,
                   help="--select canary: the plain fine-tuning lr that implants the canaries (default: 1e-3 for "
                        "clipguard's small models, 1e-4 for others)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard.training.run import finetune_start

    weights, name = finetune_start(args.checkpoint, args.model)
    args.model = name
    if args.lr_search:
        return _search(args, weights)
    last = run_training(args, stage="finetune", checkpoint=weights)
    shown = ", ".join(f"{k}={v}" for k, v in last.items() if k in ("epoch", "loss", "zeroshot_top1"))
    print(f"finished: {args.out} ({shown}); started from {weights}")
    return 0


def _search(args: argparse.Namespace, weights: str) -> int:
    from clipguard.commands.common import csv_spec
    from clipguard.commands.train import spec_from_args
    from clipguard.errors import ConfigError
    from clipguard.training.canary import CanaryOptions
    from clipguard.training.lr_search import lr_search, parse_lrs

    if args.lr is not None:
        raise ConfigError("--lr and --lr-search exclude each other: the search sets the learning rate")
    lrs = parse_lrs(args.lr_search)
    canary = CanaryOptions(implant_lr=args.canary_lr)
    spec = spec_from_args(args, stage="finetune", checkpoint=weights)
    res = lr_search(spec, lrs, args.budget, args.data, args.out, eval_data=args.eval_data, classes=args.classes,
                    select=args.select, canary=canary, resume=args.resume, overwrite=args.overwrite, data_spec=csv_spec(args),
                    dataset_type=args.dataset_type, lazy_images=args.lazy_images, limit=args.limit,
                    skip_bad_rows=args.skip_bad_rows, attack_manifest=args.attack_manifest)
    if not res.get("finished"):
        print(f"stopped: {args.out} (continue with --resume latest)")
        return 0
    if "canary" in res:
        k = res["canary"]
        print("canaries: " + ", ".join(f"{a} -> {t} ({x:.0f}% ASR@1 implanted)" for a, t, x in
                                       zip(k["attacks"], k["targets"], k["implant"]["asr"])))
    for c in res["candidates"]:
        mark = " <- chosen" if c["lr"] == res["chosen"]["lr"] else ""
        left = f", canaries left {c['canary']:.1f}%" if "canary" in c else ""
        print(f"lr {c['lr']:g}: zero-shot {c['zeroshot']:.1f} ({c['zeroshot'] - res['start_zeroshot']:+.1f}), "
              f"drift {c['drift']:.3f}{left}{mark}")
    print(f"finished: {args.out} is the run at lr {res['chosen']['lr']:g} ({res['why']}); "
          f"start zero-shot {res['start_zeroshot']:.1f}, budget {res['budget']:g} points")
    chosen = res["chosen"]
    if not res.get("within_budget", True):  # searches written before this key existed: no warning
        left = f"; {chosen['canary']:.0f}% of the canaries are left in its copy" if "canary" in chosen else ""
        print(f"warning: no learning rate kept zero-shot within {res['budget']:g} points, so the most accurate "
              f"one was kept{left}: it may not have removed a backdoor. More clean pairs, a larger "
              "--budget or other rates may help (docs/finetuning.md#canaries)", file=sys.stderr)
    return 0
