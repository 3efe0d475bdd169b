"""Which poisons does a detector miss? AUROC per attack part, split by the poison's source class.

A backdoor poison is an image of some class (its source) with the trigger, captioned as the target.
A detector that reads how far the poisoned model moved a pair (``shift``) should find a triggered
coat captioned "pullover" harder than a triggered sneaker captioned "pullover": the model had less
far to move it. This reads a bench folder's scan-only (or detect-then-train) cells and prints, per
seed and attack part, each source class's AUROC against every clean pair, so the misses can be
traced to the classes next to the target.

    .venv/bin/python benchmarks/scan_by_source.py runs/detect-60k-select --attack p1 --scan scan-CLIP --detector shift

The source classes come from the label column of the poisoned training CSV the bench wrote (its
last part's manifest names it); the class names from the manifest's classes file.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score


def part_manifests(seed_dir: Path) -> list[dict[str, Any]]:
    """Every attack part's manifest of one seed's poisoned set, each with its folder as ``_dir``."""
    manifests = [json.loads(p.read_text()) | {"_dir": p.parent} for p in sorted(seed_dir.glob("part*/manifest.json"))]
    if not manifests:
        sys.exit(f"{seed_dir}: no attack part manifests (part*/manifest.json)")
    return manifests


def last_part(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of the part that wrote the whole poisoned set (the one with the most rows)."""
    return max(manifests, key=lambda m: int(m["n_rows"]))


def source_labels(manifest: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Every training row's label (a poison's: its source class) and the class names."""
    spec = manifest["csv"]
    path = manifest["_dir"] / "train.csv"
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter=spec.get("separator", "\t"))
        key = spec.get("label_key") or "label"
        try:
            labels = np.array([int(row[key]) for row in reader])
        except (KeyError, ValueError) as e:
            sys.exit(f"{path}: column {key!r} must hold an integer class per row ({e})")
    names = json.loads((manifest["_dir"] / manifest["classes"]).read_text())["classes"]
    return labels, names


def by_source(scores_csv: Path, labels: np.ndarray, detector: str) -> dict[str, dict[str, tuple[int, float]]]:
    """{part: {source class index: (poisons, AUROC against every clean pair, %)}}."""
    with scores_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    col = f"{detector}_score"
    if not rows or col not in rows[0]:
        sys.exit(f"{scores_csv}: no column {col!r}; run the scan with detector '{detector}'")
    if len(rows) != len(labels):
        sys.exit(f"{scores_csv}: {len(rows)} rows, but the poisoned training CSV has {len(labels)}")
    scores = np.array([float(r[col]) for r in rows])
    part = np.array([r["part"] for r in rows])
    poisoned = np.array([r["poisoned"] == "1" for r in rows])
    clean = scores[~poisoned]
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for name in sorted(set(part[poisoned])):
        idx = np.flatnonzero(part == name)
        out[name] = {}
        for c in sorted(set(labels[idx].tolist())):
            sel = scores[idx[labels[idx] == c]]
            y = np.r_[np.zeros(len(clean)), np.ones(len(sel))]
            out[name][str(c)] = (len(sel), 100 * roc_auc_score(y, np.r_[clean, sel]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the bench folder")
    ap.add_argument("--dataset", default="fmnist60k")
    ap.add_argument("--attack", default="p1")
    ap.add_argument("--scan", default="scan-CLIP", help="the cell's run folder name (scan-<base> or pretrain-<label>)")
    ap.add_argument("--detector", default="shift")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    seeds = sorted((args.out / "runs" / args.dataset / args.attack).glob("seed*"))
    if not seeds:
        sys.exit(f"{args.out}: no runs/{args.dataset}/{args.attack}/seed* folders")
    result: dict[str, Any] = {}
    for seed_dir in seeds:
        scores_csv = seed_dir / args.scan / "scores.csv"
        if not scores_csv.is_file():
            print(f"{scores_csv}: missing, skipped", file=sys.stderr)
            continue
        manifests = part_manifests(args.out / "poison" / args.dataset / args.attack / seed_dir.name)
        labels, names = source_labels(last_part(manifests))
        figures = by_source(scores_csv, labels, args.detector)
        targets = {m["attack"]: m["target"]["name"] for m in manifests}
        result[seed_dir.name] = {}
        for part, per_class in figures.items():
            named = {names[int(c)]: v for c, v in per_class.items()}
            target = targets.get(part.split(":")[-1])  # a grid with label columns names parts 'p1:badnet'
            result[seed_dir.name][part] = {"target": target, "sources": named}
            worst = sorted(named.items(), key=lambda kv: kv[1][1])
            cells = ", ".join(f"{n} {a:.1f} ({k})" for n, (k, a) in worst)
            print(f"{seed_dir.name} {part:8s} target {target or '?':11s} {cells}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
