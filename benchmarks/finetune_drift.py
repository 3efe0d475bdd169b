"""How far did each fine-tuning defence move the model? A measure a defender can take without a trigger.

(:func:`clipguard.evaluation.drift.embedding_drift`, the quantity ``clipguard finetune --lr-search``
uses, over every fine-tuning cell of a bench grid.)

For every fine-tuning cell of a bench output folder, the clean validation images (the rows
``split: val`` holds out of training, or ``--data CSV``) are encoded by the model the cell started
from and by the model it ended with, and the mean squared distance of the L2-normalised
embeddings is printed per method (mean ± std over seeds), next to the cell's zero-shot accuracy
and its change against the start. Squared distance of unit vectors is 2 - 2 cos: 0 is "did not
move", 2 is "orthogonal" (PAR's push, measured the same way on training views, stops at ``tau``).

This is what chose the fine-tuning defaults (configs/finetune-select.yaml, round 2): the entry
that moved the clean images farthest among those within 3 zero-shot points of the start. ASR is
printed only with ``--asr``, for reading a finished choice.

    .venv/bin/python benchmarks/finetune_drift.py runs/finetune-val [--json drift.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


def val_csv(out: Path, cell: dict[str, Any]) -> Path:
    """The validation rows a ``split: val`` cell of bench folder ``out`` was evaluated on."""
    ds = cell["config"]["dataset"]
    if cell.get("split") == "val":
        return out / "data" / ds["label"] / f"val{ds['val_size']}-seed{ds['data_seed']}" / "val.csv"
    raise SystemExit(f"{cell['cell']}: a test-split grid; pass --data with clean validation rows instead")


def csv_spec(cell: dict[str, Any], allow_outside_root: bool = True):
    """The CSV keys and separator of the cell's dataset (the bench's validation rows point at images
    outside their own folder)."""
    from clipguard.data.csv_dataset import CsvSpec

    ds = cell["config"]["dataset"]
    return CsvSpec(img_key=ds["img_key"], caption_key=ds["caption_key"], label_key=ds["label_key"],
                   separator=ds["separator"], allow_outside_root=allow_outside_root)


def _encode(checkpoint: str | Path, model_name: str, images) -> torch.Tensor:
    from clipguard.api import load_model
    from clipguard.evaluation.features import encode_images

    net, _ = load_model(checkpoint, model=model_name)
    return encode_images(net, images, "cpu")


def _drift(start: torch.Tensor, checkpoint: str | Path, model_name: str, images) -> float:
    from clipguard.api import load_model
    from clipguard.evaluation.drift import embedding_drift

    return embedding_drift(start, load_model(checkpoint, model=model_name)[0], images)


def drift_table(out: Path, data: Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per fine-tuning cell: method, seed, drift, zero-shot and the start's zero-shot."""
    from clipguard.api import load_data

    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    by_id = {c["cell"]: c for c in cells}
    starts: dict[tuple[str, str], torch.Tensor] = {}
    images: dict[Path, Any] = {}
    rows = []
    for c in cells:
        if c.get("stage") != "finetune":
            continue
        csv = data or val_csv(out, c)
        if csv not in images:
            images[csv] = load_data(csv, model=c["model"], spec=csv_spec(c, allow_outside_root=data is None),
                                    limit=limit).images
        start_ckpt = c["train_config"]["checkpoint"]
        key = (start_ckpt, str(csv))
        if key not in starts:
            starts[key] = _encode(start_ckpt, c["model"], images[csv])
        drift = _drift(starts[key], out / c["run_dir"], c["model"], images[csv])
        base_id = c["cell"].replace(c["method"], c["base"])
        base = by_id.get(base_id, {})
        rows.append({"method": c["method"], "seed": c["seed"], "drift": drift,
                     "zeroshot": c["metrics"]["zeroshot_top1"] * 100,
                     "start_zeroshot": base.get("metrics", {}).get("zeroshot_top1", float("nan")) * 100,
                     "asr": {a["attack"]: (a["headline"]["value"] or 0) * 100 for a in c.get("asr", [])}})
    return rows


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main(argv: list[str] | None = None) -> None:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns once per model it builds
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a bench output folder with fine-tuning cells")
    ap.add_argument("--data", type=Path, help="clean rows to encode (default: the grid's validation rows)")
    ap.add_argument("--limit", type=int, help="encode only the first N rows")
    ap.add_argument("--asr", action="store_true", help="also print ASR@1 per attack (after a choice is made)")
    ap.add_argument("--json", type=Path, help="write the per-cell rows here")
    args = ap.parse_args(argv)
    rows = drift_table(args.out, args.data, args.limit)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["method"]].append(r)
    print(f"{'method':34s} {'n':>2s} {'drift':>15s} {'zero-shot':>12s} {'vs start':>9s}" + ("  ASR@1" if args.asr else ""))
    for method, rs in sorted(groups.items(), key=lambda kv: -statistics.mean(r["drift"] for r in kv[1])):
        zs = [r["zeroshot"] for r in rs]
        delta = statistics.mean(r["zeroshot"] - r["start_zeroshot"] for r in rs)
        line = f"{method:34s} {len(rs):2d} {_ms([r['drift'] for r in rs]):>15s} {statistics.mean(zs):6.1f} ± {statistics.stdev(zs) if len(zs) > 1 else 0:3.1f} {delta:+9.1f}"
        if args.asr:
            attacks = sorted({a for r in rs for a in r["asr"]})
            line += "  " + ", ".join(f"{a} {statistics.mean(r['asr'].get(a, 0) for r in rs):.1f}" for a in attacks)
        print(line)


if __name__ == "__main__":
    main()
