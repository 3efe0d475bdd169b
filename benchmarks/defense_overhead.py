"""Overhead of the pre-training defences against plain CLIP, measured in one run.

Trains plain CLIP, SafeCLIP and RoCLIP with their default schedules for the same number of
epochs on the same data and seed. With ``--repeats`` the three fits are repeated in a rotated
order and every figure is the median over repeats of a ratio taken within one repeat, so
background load hits all three alike. It prints:
  - wall time of each defence / wall time of CLIP (whole fit, hooks included; at the default
    32 epochs this is the default schedule's ratio, the paper's 1.30x for SafeCLIP);
  - SafeCLIP's cost per phase in CLIP-epoch units (unimodal epoch, low-lr CLIP epoch, mixed
    epoch with its split);
  - the first split (scores of every pair + the GMM fit) in CLIP epochs (paper: 0.35);
  - one later split update (top-q re-evaluation + ranking) in CLIP epochs (paper: 0.1);
  - RoCLIP's pool epoch and its other epochs in CLIP epochs.
A CLIP epoch is the mean per-epoch training time of the CLIP run. Imports, WordNet and the
allocator are warmed up by short untimed fits first.

    .venv/bin/python benchmarks/defense_overhead.py --pairs 4000 --model cg-nano --repeats 3
    .venv/bin/python benchmarks/defense_overhead.py --pairs 4000 --safeclip-opt risky_loss=none
    .venv/bin/python benchmarks/defense_overhead.py --pairs 4000 --roclip-opt align_before_pool=null
    .venv/bin/python benchmarks/defense_overhead.py --data path/train.csv --device cuda --epochs 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clipguard.data.csv_dataset import load_csv
from clipguard.errors import ConfigError
from clipguard.io import read_jsonl, write_json
from clipguard.training.build import build_trainer
from clipguard.training.spec import parse_options, resolve_spec

KINDS = ("none", "safeclip", "roclip")
PAPER = {"first_split": 0.35, "split_update": 0.1, "safeclip_total_overhead_5_warmup": 0.2984, "roclip_epoch": 1.06}


def run(name: str, options: dict, data, out: Path, args, epochs: int | None = None) -> tuple[float, list[dict]]:
    spec = resolve_spec(defense=name, options=options, train={
        "model": args.model, "epochs": epochs or args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "device": args.device, "quiet": True, "keep_checkpoints": 1, "trim_text": args.trim_text})
    t0 = time.perf_counter()
    build_trainer(spec, data, out / name).fit()
    wall = time.perf_counter() - t0
    return wall, read_jsonl(out / name / "results.jsonl")


def one_repeat(clip: tuple[float, list[dict]], safe: tuple[float, list[dict]],
               ro: tuple[float, list[dict]]) -> dict[str, float | None]:
    """Every figure of one repeat, in CLIP-epoch units of that repeat's CLIP run."""
    (clip_wall, clip_recs), (safe_wall, safe_recs), (ro_wall, ro_recs) = clip, safe, ro
    clip_epoch = statistics.mean(r["seconds"] for r in clip_recs)

    def mean_over(recs: list[dict], keep, with_hook: bool = True) -> float | None:
        xs = [r["seconds"] + (r.get("hook_seconds", 0.0) if with_hook else 0.0) for r in recs if keep(r)]
        return statistics.mean(xs) / clip_epoch if xs else None

    first = [r for r in safe_recs if r.get("first_split")]
    later = [r for r in safe_recs if r.get("phase") == "mixed" and not r.get("first_split")]
    return {
        "clip_epoch_seconds": clip_epoch,
        "safeclip_wall_over_clip": safe_wall / clip_wall,
        "roclip_wall_over_clip": ro_wall / clip_wall,
        "safeclip_unimodal_epoch_in_clip_epochs": mean_over(safe_recs, lambda r: r.get("phase") == "unimodal"),
        "safeclip_low_lr_epoch_in_clip_epochs": mean_over(safe_recs, lambda r: r.get("phase") == "clip_low"),
        "safeclip_mixed_epoch_in_clip_epochs": mean_over(safe_recs, lambda r: r.get("phase") == "mixed"),
        "safeclip_later_mixed_epoch_in_clip_epochs": mean_over(later, lambda r: True),
        "first_split_in_clip_epochs": first[0]["split_seconds"] / clip_epoch if first else None,
        "gmm_fit_in_clip_epochs": first[0]["gmm_seconds"] / clip_epoch if first else None,
        "split_update_in_clip_epochs": (statistics.mean(r["split_seconds"] for r in later) / clip_epoch
                                        if later else None),
        "roclip_pool_epoch_in_clip_epochs": mean_over(ro_recs, lambda r: r.get("pool_epoch")),
        "roclip_clip_epoch_in_clip_epochs": mean_over(ro_recs, lambda r: not r.get("pool_epoch")),
    }


def training_csv(data: str | None, tmp: Path, pairs: int, seed: int) -> Path:
    """``--data`` as given, or ``pairs`` Fashion-MNIST training pairs materialised under ``tmp``."""
    if data:
        return Path(data)
    from clipguard.data.fashion_mnist import materialise

    return materialise(tmp / "fm", train_size=pairs, test_size=100, seed=seed) / "train.csv"


def summarise(runs: dict[str, list[tuple[float, list[dict]]]], pairs: int, args) -> dict:
    """The median over repeats of every per-repeat figure."""
    per_repeat = [one_repeat(*(runs[k][i] for k in KINDS)) for i in range(len(runs["none"]))]
    res: dict = {"pairs": pairs, "epochs": args.epochs, "device": args.device, "model": args.model,
                 "repeats": len(per_repeat)}
    for key in per_repeat[0]:
        vals = [r[key] for r in per_repeat if r[key] is not None]
        res[key] = round(statistics.median(vals), 3) if vals else None
        if len(vals) > 1:
            res[key + "_range"] = [round(min(vals), 3), round(max(vals), 3)]
    res["paper"] = PAPER
    return res


def warm_up(data, tmp: Path, args) -> None:
    """Short untimed fits of each kind, so imports, WordNet and allocator warm-up are not timed."""
    small = data.subset(range(min(len(data), 4 * args.batch_size)))
    for name in KINDS:
        run(name, {"warmup_epochs": 1} if name == "safeclip" else {}, small, tmp / "warm", args, epochs=3)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="training CSV (default: a fresh Fashion-MNIST subset)")
    p.add_argument("--pairs", type=int, default=4000, help="pairs to use (materialised or --limit)")
    p.add_argument("--epochs", type=int, default=32, help="every defence runs its default schedule for this budget")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="cg-nano")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="SafeCLIP's r for this benchmark (default: its library default)")
    p.add_argument("--safeclip-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a SafeCLIP option for this benchmark, e.g. --safeclip-opt risky_loss=none (repeatable)")
    p.add_argument("--roclip-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a RoCLIP option for this benchmark, e.g. --roclip-opt align_before_pool=null "
                        "(pool epochs on schedule even before the model has aligned; repeatable)")
    p.add_argument("--trim-text", action=argparse.BooleanOptionalAction, default=None,
                   help="every fit's text tower on the captions only (default: the trainer's, on for a GPU)")
    p.add_argument("--repeats", type=int, default=1, help="repeat the three fits in a rotated order; report medians")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # SafeCLIP's own default schedule unless --warmup-epochs is given (None is an option value:
    # "10% of the epochs", not "the default"); the options are checked before anything is trained
    safe_opts = {} if args.warmup_epochs is None else {"warmup_epochs": args.warmup_epochs}
    try:
        safe_opts.update(parse_options(args.safeclip_opt, "--safeclip-opt"))
        resolve_spec(defense="safeclip", options=safe_opts)
        ro_opts = parse_options(args.roclip_opt, "--roclip-opt")
        resolve_spec(defense="roclip", options=ro_opts)
    except ConfigError as e:
        p.error(str(e))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = training_csv(args.data, tmp, args.pairs, args.seed)
        data = load_csv(csv, image_size=28 if args.model.startswith("cg-tiny") else None, limit=args.pairs)
        warm_up(data, tmp, args)
        fits = [("none", {}), ("safeclip", safe_opts), ("roclip", ro_opts)]
        runs: dict[str, list[tuple[float, list[dict]]]] = {k: [] for k in KINDS}
        for r in range(args.repeats):
            for name, opts in fits[r % 3:] + fits[:r % 3]:
                runs[name].append(run(name, opts, data, tmp / f"repeat{r}", args))
    res = summarise(runs, len(data), args)
    res["safeclip_options"] = safe_opts
    res["roclip_options"] = ro_opts

    def show(label: str, key: str, note: str = "") -> None:
        v, rng = res[key], res.get(key + "_range")
        spread = f"  [{rng[0]}, {rng[1]}]" if rng else ""
        print(f"{label:<44}{v}{spread}{note}")

    res["trim_text"] = args.trim_text
    print(f"data: {res['pairs']} pairs, {args.epochs} epochs, {args.model} on {args.device}, trim_text {args.trim_text}, "
          f"{torch.get_num_threads()} threads; CLIP epoch {res['clip_epoch_seconds']:.2f} s; "
          f"medians of {res['repeats']} repeat(s) [min, max]")
    show("SafeCLIP wall / CLIP wall (default schedule)", "safeclip_wall_over_clip", "  (paper: 1.30)")
    show("RoCLIP wall / CLIP wall", "roclip_wall_over_clip")
    show("SafeCLIP unimodal epoch", "safeclip_unimodal_epoch_in_clip_epochs", " CLIP epochs")
    show("SafeCLIP low-lr CLIP epoch", "safeclip_low_lr_epoch_in_clip_epochs", " CLIP epochs")
    show("SafeCLIP mixed epoch, split included", "safeclip_mixed_epoch_in_clip_epochs", " CLIP epochs")
    show("  the same, after the first split", "safeclip_later_mixed_epoch_in_clip_epochs", " CLIP epochs")
    show("first split (scores + GMM)", "first_split_in_clip_epochs", " CLIP epochs (paper 0.35)")
    show("  GMM alone", "gmm_fit_in_clip_epochs", " CLIP epochs")
    show("one split update (top-q re-evaluation)", "split_update_in_clip_epochs", " CLIP epochs (paper 0.1)")
    show("RoCLIP pool epoch", "roclip_pool_epoch_in_clip_epochs", " CLIP epochs")
    show("RoCLIP other epochs (plain CLIP, plain_views)", "roclip_clip_epoch_in_clip_epochs", " CLIP epochs")
    if args.json:
        write_json(args.json, res)
    else:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
