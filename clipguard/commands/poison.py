"""``clipguard poison``: write a poisoned copy of a dataset plus its manifest (and ASR set)."""

from __future__ import annotations

import argparse

from clipguard.commands.common import add_csv_args, csv_spec


def add_parser(sub) -> None:
    p = sub.add_parser("poison", help="poison an image-caption CSV (TDPA, backdoors) with a manifest",
                       description="Poison a dataset with a registered attack; `--list` shows every "
                                   "attack and its options (docs/attacks.md explains them).")
    p.add_argument("--list", action="store_true", help="list the attacks and their options, then exit")
    p.add_argument("--data", help="clean training CSV")
    p.add_argument("--attack", help="attack name")
    p.add_argument("--target", help="target class (name, synonym or index); TDPA: the adversarial class")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, default=None, help="poisoned pairs as a fraction of the training rows")
    g.add_argument("--count", type=int, default=None, help="number of poisoned pairs")
    p.add_argument("--seed", type=int, default=0, help="seeds rows, captions and (by default) the trigger")
    p.add_argument("--trigger-seed", type=int, default=None, help="seed of the trigger pattern (default: --seed)")
    p.add_argument("--out", help="output folder (DIR/train.csv, DIR/manifest.json)")
    p.add_argument("--eval-data", default=None, help="held-out CSV: writes DIR/asr_eval.csv (TDPA: required)")
    p.add_argument("--mode", choices=["inject", "replace"], default="inject",
                   help="inject: add poisoned pairs (default); replace: overwrite rows")
    p.add_argument("--classes", default=None, help="classes.json (default: beside --data)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack option, e.g. --opt size=6 --opt location=random (repeatable)")
    p.add_argument("--checkpoint", default=None, help="badclip: the model to optimise the patch against")
    p.add_argument("--steps", type=int, default=None, help="badclip: optimisation steps")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier poisoned folder at --out (one holding manifest.json); "
                        "any other non-empty folder is never replaced")
    add_csv_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard import attacks
    from clipguard.attacks import poison_csv
    from clipguard.errors import ConfigError
    from clipguard.training.spec import parse_options

    if args.list:
        for name in attacks.names():
            cls = attacks.get(name)
            print(f"{name} ({cls.kind}): options {', '.join(cls.option_names())}")
        return 0
    missing = [f"--{k}" for k in ("data", "attack", "target", "out") if not getattr(args, k)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    options = parse_options(args.opt)
    for key in ("checkpoint", "steps"):
        v = getattr(args, key)
        if v is not None:
            if args.attack != "badclip":
                raise ConfigError(f"--{key} only applies to --attack badclip")
            options[key] = v
    m = poison_csv(args.data, args.attack, target=args.target, rate=args.rate, count=args.count,
                   seed=args.seed, out=args.out, eval_csv=args.eval_data, options=options,
                   spec=csv_spec(args), mode=args.mode, classes=args.classes,
                   trigger_seed=args.trigger_seed, overwrite=args.overwrite,
                   skip_bad_rows=args.skip_bad_rows)
    ev = m.get("eval")
    if m.get("source_rows_skipped"):
        print(f"skipped {m['source_rows_skipped']} bad rows of {args.data}")
    if ev and ev.get("source_rows_skipped"):
        print(f"skipped {ev['source_rows_skipped']} bad rows of {args.eval_data}")
    print(f"wrote {args.out}/train.csv ({m['n_rows']} rows, {m['count']} poisoned by {m['attack']}, "
          f"{m['mode']}, target {m['target']['name']}) and {args.out}/manifest.json")
    if ev:
        print(f"wrote {args.out}/{ev['csv']} ({ev['n_images']} {ev['kind']} evaluation images)")
    return 0
