"""Zero-shot accuracy and ASR@1 along the straight line from a poisoned model to its cleaned version.

Weight-space interpolation (WiSE-FT: theta(a) = (1 - a) theta_start + a theta_end) is the usual way
to buy back accuracy a fine-tuning run cost. A defender could pick the largest ``a`` whose clean
validation zero-shot stays within a budget of the start. Whether that keeps the backdoor removed
depends on the shape of the path, which this script prints for one cell of a bench folder:

    .venv/bin/python benchmarks/finetune_interpolation.py runs/finetune-val \\
        --cell fmnist/three/CLIP+PAR/seed4 [--alphas 0,0.3,0.6,0.9,1]

It reads the fine-tuning cell's record (``cells/*.json``): the checkpoint it started from, its own
run folder, the validation rows it was evaluated on (``split: val``) and every attack part's
manifest, whose triggered images give ASR@1.
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
    from finetune_drift import csv_spec, val_csv  # the sibling script (benchmarks/ is sys.path[0])

    from clipguard.attacks.manifest import load_manifest
    from clipguard.data.classes import ClassInfo
    from clipguard.data.csv_dataset import load_csv
    from clipguard.evaluation.asr import asr_for_model
    from clipguard.evaluation.runner import load_model, zeroshot_metrics
    from clipguard.models.factory import get_tokenizer, image_size

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bench", type=Path, help="a bench output folder of a split: val grid (configs/finetune-select.yaml)")
    p.add_argument("--cell", required=True, help="a fine-tuning cell, e.g. fmnist/three/CLIP+PAR/seed4")
    p.add_argument("--alphas", default="0,0.3,0.5,0.6,0.7,0.8,0.9,1")
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)

    record = args.bench / "cells" / (args.cell.replace("/", "__") + ".json")
    if not record.is_file():
        raise SystemExit(f"{record}: no such cell (run the grid first)")
    cell = json.loads(record.read_text())
    if cell.get("stage") != "finetune":
        raise SystemExit(f"{args.cell}: not a fine-tuning cell")
    start, name = load_model(cell["train_config"]["checkpoint"], None, "cpu")
    end, _ = load_model(args.bench / cell["run_dir"], None, "cpu")
    sd0, sd1 = start.state_dict(), end.state_dict()
    val_rows = val_csv(args.bench, cell)
    val = load_csv(val_rows, csv_spec(cell), image_size=image_size(start))
    classes = ClassInfo.load(val_rows.parent.parent / "classes.json")
    tokenizer = get_tokenizer(name)
    manifests = {a["attack"]: load_manifest(a["manifest"]) for a in cell.get("asr", [])}
    for a in (float(x) for x in args.alphas.split(",")):
        start.load_state_dict(_interpolated(sd0, sd1, a))
        start.eval()
        zs = 100 * zeroshot_metrics(start, tokenizer, val, classes, "cpu")["acc1"]
        asr = {part: round(100 * asr_for_model(start, name, m, tokenizer=tokenizer)["zeroshot"]["asr@1"], 1)
               for part, m in manifests.items()}
        print(json.dumps({"alpha": a, "zeroshot": round(zs, 1), "asr@1": asr}), flush=True)


if __name__ == "__main__":
    main()
