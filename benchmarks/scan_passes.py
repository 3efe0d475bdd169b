"""Two scans of the same poisoned set as one detector: AUROC per attack part of each, and of their mean rank share.

Reads the ``scores.csv`` of two cells of a bench folder (scan-only or detect-then-train: each
writes one), takes a detector's score column from each, and prints per seed and attack part the
AUROC (each part's poisons against every clean pair) of the first, the second, and each pair's
mean rank share under the two (the way ``combine: mean`` joins two models' scores), then the mean
over seeds.

    .venv/bin/python benchmarks/scan_passes.py runs/detect-60k-select-second \\
        pretrain-Shift90+repeat-then-CLIP pretrain-Second90+repeat-then-CLIP --detector shift
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from clipguard.detection.runner import rank_shares

KINDS = ("first", "second", "combined")


def read_scores(path: Path, detector: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(row ids, scores, poisoned flags, attack part per row) of one cell's scores.csv."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    col = f"{detector}_score"
    if not rows or col not in rows[0] or "part" not in rows[0]:
        sys.exit(f"{path}: needs the columns {col!r} and 'part' (a scan with detector '{detector}' "
                 f"and an attack manifest)")
    return ([r["row"] for r in rows], np.array([float(r[col]) for r in rows]),
            np.array([r["poisoned"] == "1" for r in rows]), np.array([r["part"] for r in rows]))


def part_aurocs(first: Path, second: Path, detector: str) -> dict[str, dict[str, float]]:
    """{part: {first, second, combined: AUROC %}} of one seed's two scans."""
    ids_a, a, poisoned, part = read_scores(first, detector)
    ids_b, b, _, _ = read_scores(second, detector)
    if ids_a != ids_b:
        sys.exit(f"{first} and {second} score different rows")
    scores = {"first": a, "second": b, "combined": (rank_shares(a) + rank_shares(b)) / 2}
    out: dict[str, dict[str, float]] = {}
    for name in sorted(set(part[poisoned])):
        keep = ~poisoned | (part == name)
        y = part[keep] == name
        out[name] = {k: 100 * roc_auc_score(y, s[keep]) for k, s in scores.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the bench folder")
    ap.add_argument("first", help="the first cell's run folder name (scan-<base> or pretrain-<label>)")
    ap.add_argument("second", help="the second cell's run folder name")
    ap.add_argument("--dataset", default="fmnist60k")
    ap.add_argument("--attack", default="p1")
    ap.add_argument("--detector", default="shift")
    args = ap.parse_args(argv)
    seeds = sorted((args.out / "runs" / args.dataset / args.attack).glob("seed*"))
    if not seeds:
        sys.exit(f"{args.out}: no runs/{args.dataset}/{args.attack}/seed* folders")
    per_seed = {}
    for seed in seeds:
        files = [seed / args.first / "scores.csv", seed / args.second / "scores.csv"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            sys.exit(f"missing: {', '.join(missing)}")
        per_seed[seed.name] = part_aurocs(*files, args.detector)
        for name, fig in per_seed[seed.name].items():
            print(f"{seed.name} {name:14s} " + "  ".join(f"{k} {fig[k]:6.2f}" for k in KINDS))
    parts = sorted({p for fig in per_seed.values() for p in fig})
    print(f"mean over {len(per_seed)} seeds (AUROC %, {' / '.join(KINDS)}):")
    for name in parts:
        vals = [[fig[name][k] for fig in per_seed.values() if name in fig] for k in KINDS]
        print(f"  {name:14s} " + " / ".join(f"{np.mean(v):.2f}" for v in vals))


if __name__ == "__main__":
    main()
