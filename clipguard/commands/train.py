"""``clipguard train`` (pre-training) and the shared plumbing that ``finetune`` reuses."""

from __future__ import annotations

import argparse

from clipguard.commands.common import add_csv_args, csv_spec


def add_train_args(p: argparse.ArgumentParser, *, finetune: bool = False) -> None:
    p.add_argument("--data", required=True, help="training CSV")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", default=None,
                   help="model name (see `clipguard models`); default: " + ("the checkpoint's" if finetune else "cg-tiny"))
    p.add_argument("--defense", default=None,
                   help="defence name (default: " + ("ft" if finetune else "none") + ", or the preset's)")
    p.add_argument("--preset", default=None, help="YAML preset: defense, options and train settings")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a defence option, e.g. --opt warmup_epochs=5 (repeatable)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    p.add_argument("--wd", type=float, default=None, help="weight decay")
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--accum-steps", type=int, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "amp", "bf16"], default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--dataset-type", default="auto", choices=["auto", "csv", "webdataset"],
                   help="auto: shards ending in .tar (brace patterns, '::'-joined) are webdataset")
    p.add_argument("--lazy-images", action="store_true",
                   help="decode images on demand with prefetch (data larger than memory)")
    p.add_argument("--eval-data", default=None, help="labelled CSV for zero-shot after each epoch")
    p.add_argument("--classes", default=None, help="classes.json (default: beside --eval-data)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--attack-manifest", default=None,
                   help="for reporting only: poison diagnostics per epoch (never used for training)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (only the files a run writes are removed)")
    p.add_argument("--stop-after", type=int, default=None, help="run at most N epochs now")
    p.add_argument("--keep-checkpoints", type=int, default=None)
    p.add_argument("--tensorboard", action="store_true")
    # speed only (docs/scale.md#gpu-speed-settings): not part of a run's fingerprint
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the step's forward")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC weights and pixels (convolutional towers)")
    p.add_argument("--trim-text", action=argparse.BooleanOptionalAction, default=None,
                   help="the text tower on the captions, not their padding (default: on a GPU only)")
    p.add_argument("--workers", type=int, default=None, help="threads decoding on-demand images (default 8)")
    p.add_argument("--quiet", action="store_true")
    if not finetune:
        p.add_argument("--retrain-keep", type=float, default=None, metavar="F",
                       help="screen, then retrain: after training, score every pair with the final model, "
                            "drop all but the F share least suspicious and train plain CLIP from scratch on "
                            "them into --out (the first run goes to OUT/screen, the scan to OUT/scan); "
                            "0.7 was chosen on validation (docs/defenses.md#screen-then-retrain)")
        p.add_argument("--retrain-detector", default=None, metavar="NAME",
                       help="detector of the screen (default: caption-agreement; see `clipguard scan`)")
        p.add_argument("--retrain-veto", action="extend", nargs="+", default=None, metavar="NAME",
                       help="also drop the pairs this detector's own rule rejects, e.g. repeat (the copies "
                            "targeted poisoning makes; see `clipguard scan --veto-detector`)")
    if finetune:
        p.add_argument("--checkpoint", required=True, help="the (possibly poisoned) model to clean: a run or "
                       "checkpoint folder, .safetensors, or a .pt/.pth/.bin state dict (with --model)")
    add_csv_args(p)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="pre-train CLIP, optionally with a defence")
    add_train_args(p)
    p.set_defaults(func=run)


# command-line flag -> TrainConfig field; every other default lives in the library
FLAG_TO_FIELD = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "min_lr": "min_lr",
                 "warmup": "warmup", "wd": "weight_decay", "grad_clip": "grad_clip",
                 "accum_steps": "accum_steps", "precision": "precision", "device": "device", "seed": "seed",
                 "stop_after": "stop_after", "keep_checkpoints": "keep_checkpoints", "eval_every": "eval_every",
                 "model": "model", "trim_text": "trim_text", "workers": "workers", "compile": "compile",
                 "channels_last": "channels_last"}


def spec_from_args(args: argparse.Namespace, *, stage: str = "pretrain", checkpoint: str | None = None):
    """The run's RunSpec: library defaults < --preset < flags (the same rule as bench entries)."""
    from clipguard.training.spec import parse_options, resolve_spec

    flags = {key: getattr(args, flag, None) for flag, key in FLAG_TO_FIELD.items()}
    flags.update({"tensorboard": args.tensorboard or None, "quiet": args.quiet or None, "checkpoint": checkpoint})
    return resolve_spec(stage=stage, defense=args.defense, preset=args.preset,
                        options=parse_options(args.opt), train=[flags])


def run_training(args: argparse.Namespace, *, stage: str = "pretrain", checkpoint: str | None = None):
    from clipguard.training.run import train_run

    spec = spec_from_args(args, stage=stage, checkpoint=checkpoint)
    if stage == "finetune" and not args.quiet:
        from clipguard.training.recipes import recipe_name

        t = spec.train
        lr = spec.build_strategy().describe_schedule(t.lr, t.warmup)
        print(f"fine-tuning {t.model}: {t.epochs} epochs, batch {t.batch_size}, {lr} "
              f"(unset values from {recipe_name(t.model)}; docs/finetuning.md#settings)")
    return train_run(spec, args.data, args.out, data_spec=csv_spec(args), dataset_type=args.dataset_type,
                     lazy_images=args.lazy_images, limit=args.limit, skip_bad_rows=args.skip_bad_rows,
                     eval_data=args.eval_data, classes=args.classes, attack_manifest=args.attack_manifest,
                     resume=args.resume, overwrite=args.overwrite, retrain=retrain_options(args))


def retrain_options(args: argparse.Namespace):
    """``--retrain-keep`` / ``--retrain-detector`` / ``--retrain-veto`` as ScreenOptions (None: train once)."""
    from clipguard.training.screen import ScreenOptions

    return ScreenOptions.from_flags(getattr(args, "retrain_keep", None), getattr(args, "retrain_detector", None),
                                    getattr(args, "retrain_veto", None))


def run(args: argparse.Namespace) -> int:
    last = run_training(args)
    shown = ", ".join(f"{k}={v}" for k, v in last.items() if k in ("epoch", "loss", "zeroshot_top1"))
    print(f"finished: {args.out} ({shown})" if shown else f"finished: {args.out} (nothing left to train)")
    if last.get("screen", {}).get("stopped"):
        print(f"the screening run in {args.out}/screen stopped before its last epoch; --resume latest finishes "
              f"it, then scans and retrains")
    elif "screen" in last:
        s = last["screen"]
        poisons = f", {s['poisons_kept']} of {s['n_poisoned']} poisoned pairs kept" if s.get("n_poisoned") else ""
        print(f"retrained on {s['kept']} of {s['n_pairs']} pairs{poisons}; the screening run is in "
              f"{args.out}/screen, its scan in {args.out}/scan")
    return 0
