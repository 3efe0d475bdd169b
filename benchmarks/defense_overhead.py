"""Overhead of the pre-training defences against plain CLIP, measured in one run.

Trains plain CLIP, SafeCLIP and RoCLIP for the same number of epochs on the same data (one
after the other, same seed) and prints:
  - wall time of each defence / wall time of CLIP (whole fit, hooks included);
  - SafeCLIP's cost per phase in CLIP-epoch units (unimodal epoch, low-lr CLIP epoch, mixed epoch);
  - the first split (similarities of every pair + the GMM fit) in CLIP epochs (paper: 0.35);
  - one later split update (top-q re-evaluation + ranking) in CLIP epochs (paper: 0.1).
A CLIP epoch is the mean per-epoch training time of the CLIP run.

    .venv/bin/python benchmarks/defense_overhead.py --pairs 4000 --epochs 6
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
from clipguard.io import read_jsonl, write_json
from clipguard.training.build import build_trainer
from clipguard.training.spec import resolve_spec


def run(name: str, options: dict, data, out: Path, args) -> tuple[float, list[dict]]:
    spec = resolve_spec(defense=name, options=options, train={
        "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "device": args.device, "quiet": True, "keep_checkpoints": 1})
    t0 = time.perf_counter()
    build_trainer(spec, data, out / name).fit()
    wall = time.perf_counter() - t0
    return wall, read_jsonl(out / name / "results.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="training CSV (default: a fresh Fashion-MNIST subset)")
    p.add_argument("--pairs", type=int, default=4000, help="pairs to use (materialised or --limit)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="cg-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="SafeCLIP's r for this benchmark (default: its own, sized from --epochs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data:
            csv = Path(args.data)
        else:
            from clipguard.data.fashion_mnist import materialise

            csv = materialise(tmp / "fm", train_size=args.pairs, test_size=100, seed=args.seed) / "train.csv"
        data = load_csv(csv, image_size=28 if args.model.startswith("cg-tiny") else None, limit=args.pairs)
        safe_opts = {"warmup_epochs": args.warmup_epochs}  # SafeCLIP's defaults otherwise
        clip_wall, clip_recs = run("none", {}, data, tmp, args)
        safe_wall, safe_recs = run("safeclip", safe_opts, data, tmp, args)
        ro_wall, ro_recs = run("roclip", {"match_every": 2}, data, tmp, args)

    clip_epoch = statistics.mean(r["seconds"] for r in clip_recs)

    def phase_cost(ph: str) -> float | None:
        xs = [r["seconds"] + r.get("hook_seconds", 0.0) for r in safe_recs if r.get("phase") == ph]
        return round(statistics.mean(xs) / clip_epoch, 3) if xs else None

    first = [r for r in safe_recs if r.get("first_split")]
    later = [r for r in safe_recs if r.get("phase") == "mixed" and not r.get("first_split")
             and not r.get("full_evaluation")]
    res = {
        "pairs": len(data), "epochs": args.epochs, "device": args.device, "clip_epoch_seconds": round(clip_epoch, 3),
        "safeclip_wall_over_clip": round(safe_wall / clip_wall, 3),
        "roclip_wall_over_clip": round(ro_wall / clip_wall, 3),
        "safeclip_unimodal_epoch_in_clip_epochs": phase_cost("unimodal"),
        "safeclip_low_lr_epoch_in_clip_epochs": phase_cost("clip_low"),
        "safeclip_mixed_epoch_in_clip_epochs": phase_cost("mixed"),
        "first_split_in_clip_epochs": round(first[0]["split_seconds"] / clip_epoch, 3) if first else None,
        "gmm_fit_in_clip_epochs": round(first[0]["gmm_seconds"] / clip_epoch, 3) if first else None,
        "split_update_in_clip_epochs": (round(statistics.mean(r["split_seconds"] for r in later) / clip_epoch, 3)
                                        if later else None),
        "roclip_pool_epoch_in_clip_epochs": round(statistics.mean(
            r["seconds"] for r in ro_recs if r.get("pool_epoch")) / clip_epoch, 3),
        "roclip_clip_epoch_in_clip_epochs": round(statistics.mean(
            r["seconds"] for r in ro_recs if not r.get("pool_epoch")) / clip_epoch, 3),
        "paper": {"first_split": 0.35, "split_update": 0.1, "safeclip_total_overhead_5_warmup": 0.2984,
                  "roclip_epoch": 1.06},
    }
    print(f"data: {res['pairs']} pairs, {args.epochs} epochs, {args.device}; CLIP epoch {clip_epoch:.2f} s")
    print(f"SafeCLIP wall / CLIP wall          {res['safeclip_wall_over_clip']:.3f}")
    print(f"RoCLIP   wall / CLIP wall          {res['roclip_wall_over_clip']:.3f}")
    print(f"SafeCLIP unimodal epoch            {res['safeclip_unimodal_epoch_in_clip_epochs']} CLIP epochs")
    print(f"SafeCLIP low-lr CLIP epoch         {res['safeclip_low_lr_epoch_in_clip_epochs']} CLIP epochs")
    print(f"SafeCLIP mixed epoch (incl. split) {res['safeclip_mixed_epoch_in_clip_epochs']} CLIP epochs")
    print(f"first split (sims + GMM)           {res['first_split_in_clip_epochs']} CLIP epochs (paper 0.35);"
          f" GMM alone {res['gmm_fit_in_clip_epochs']}")
    print(f"one split update (top-q re-eval)   {res['split_update_in_clip_epochs']} CLIP epochs (paper 0.1)")
    print(f"RoCLIP pool epoch / CLIP epoch     {res['roclip_pool_epoch_in_clip_epochs']}"
          f" (its CLIP+aug epochs: {res['roclip_clip_epoch_in_clip_epochs']}; paper: 1.06 overall)")
    if args.json:
        write_json(args.json, res)
    else:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
