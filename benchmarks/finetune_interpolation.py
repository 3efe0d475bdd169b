"""Zero-shot accuracy and ASR@1 along the straight line from a poisoned model to its cleaned version.

Weight-space interpolation (WiSE-FT: theta(a) = (1 - a) theta_start + a theta_end) is the usual way
to buy back accuracy a fine-tuning run cost. A defender could pick the largest ``a`` whose clean
validation zero-shot stays within a budget of the start. Whether that keeps the backdoor removed
depends on the shape of the path, which this script prints for one cell of a bench folder:

    .venv/bin/python benchmarks/finetune_interpolation.py runs/finetune-val \\
        --cell fmnist/three/seed4 --method PAR [--alphas 0,0.3,0.6,0.9,1]

It reads the cell's start (``pretrain-<base>``) and end (``finetune-<method>``) run folders, the
validation rows the bench held out (``split: val``) and every attack part's triggered images.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch


def _interpolated(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], a: float) -> dict[str, torch.Tensor]:
    return {k: start[k] + a * (end[k] - start[k]) if start[k].is_floating_point() else end[k] for k in start}


def main() -> None:
    from clipguard.attacks.manifest import load_manifest
    from clipguard.data.classes import ClassInfo
    from clipguard.data.csv_dataset import CsvSpec, load_csv
    from clipguard.evaluation.asr import asr_for_model
    from clipguard.evaluation.runner import load_model, zeroshot_metrics
    from clipguard.models.factory import get_tokenizer, image_size

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bench", help="a bench output folder of a split: val grid (configs/finetune-select.yaml)")
    p.add_argument("--cell", required=True, help="DATASET/ATTACK/seedN, e.g. fmnist/three/seed4")
    p.add_argument("--method", required=True, help="the fine-tuning entry, e.g. PAR or CleanerCLIP-lr3e-3")
    p.add_argument("--base", default="CLIP", help="the pre-training entry it started from (default CLIP)")
    p.add_argument("--alphas", default="0,0.3,0.5,0.6,0.7,0.8,0.9,1")
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)

    bench = Path(args.bench)
    dataset, attack, seed = args.cell.split("/")
    runs = bench / "runs" / dataset / attack / seed
    vals = sorted((bench / "data" / dataset).glob("val*/val.csv"))
    if not vals:
        raise SystemExit(f"{bench}: no held-out validation rows (run a grid with split: val)")
    start, name = load_model(runs / f"pretrain-{args.base}", None, "cpu")
    end, _ = load_model(runs / f"finetune-{args.method}", None, "cpu")
    sd0, sd1 = start.state_dict(), end.state_dict()
    val = load_csv(vals[0], CsvSpec(allow_outside_root=True), image_size=image_size(start))
    classes = ClassInfo.load(bench / "data" / dataset / "classes.json")
    tokenizer = get_tokenizer(name)
    manifests = [load_manifest(m) for m in sorted((bench / "poison" / dataset / attack / seed).glob("part*/manifest.json"))]
    parts = [str(m["attack"]) for m in manifests]
    for a in (float(x) for x in args.alphas.split(",")):
        start.load_state_dict(_interpolated(sd0, sd1, a))
        start.eval()
        zs = 100 * zeroshot_metrics(start, tokenizer, val, classes, "cpu")["acc1"]
        asr = {part: round(100 * asr_for_model(start, name, m, tokenizer=tokenizer)["zeroshot"]["asr@1"], 1)
               for part, m in zip(parts, manifests)}
        print(json.dumps({"alpha": a, "zeroshot": round(zs, 1), "asr@1": asr}), flush=True)


if __name__ == "__main__":
    main()
