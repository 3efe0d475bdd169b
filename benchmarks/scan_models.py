"""Which model should score a dataset for ``clipguard scan``? Detection AUROC per attack with three.

For every seed of a bench grid's poisoned Fashion-MNIST set (an attack with several parts, e.g.
``four`` of configs/safeclip-defaults.yaml), the pairs are scored by:

  poisoned   the grid's plain CLIP trained on that poisoned data (as the ICLR 2025 paper does;
             only when the grid's ``pretrain-CLIP`` run exists in ``--out``)
  trusted    plain CLIP trained on ``--trusted-size`` clean pairs the grid never trains on (rows
             of the Fashion-MNIST training pool outside the grid's training set; a defender's
             small trusted set), ``--trusted-epochs`` epochs
  warm-up    SafeCLIP's unimodal warm-up run on the poisoned data itself, ``--warmup-epochs``
             epochs (image and text towers trained apart: no trusted data needed)

and each detector's AUROC on every attack part (clean pairs against that part's poisons) is
printed as mean ± std over the seeds (the value alone for one seed) and written to ``--json``.

    .venv/bin/python benchmarks/scan_models.py configs/safeclip-defaults.yaml --out runs/defaults10 \\
        --attack four --work runs/scan-models --json scan-models.json
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

import numpy as np

DETECTORS: list[tuple[str, dict[str, Any]]] = [
    ("similarity", {}), ("caption-agreement", {"k": 16}), ("caption-agreement", {"k": 64}), ("repeat", {}), ("kdist", {}),
    ("kdist", {"space": "joint"}), ("lid", {}), ("dao", {}), ("iforest", {})]


def trusted_csv(grid_train: Path, size: int, data_seed: int, work: Path) -> Path:
    """``size`` clean Fashion-MNIST pairs outside the grid's training CSV (same pool, same seed:
    the grid's rows are a prefix of a larger draw, so the extra rows are new images)."""
    from clipguard.data.fashion_mnist import materialise

    with open(grid_train, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    pool = materialise(work / f"fm-{len(rows) + size}-s{data_seed}", train_size=len(rows) + size,
                       test_size=10, seed=data_seed)
    used = {r["filepath"] for r in rows}
    with open(pool / "train.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        extra = [r for r in reader if r["filepath"] not in used][:size]
        fields = reader.fieldnames
    if len(extra) < size:
        raise SystemExit(f"only {len(extra)} Fashion-MNIST rows outside the grid's training set")
    out = pool / f"trusted{size}.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
        w.writeheader()
        w.writerows(extra)
    return out


def train(spec_kw: dict[str, Any], data, run: Path) -> Path:
    from clipguard.training.build import build_trainer
    from clipguard.training.spec import resolve_spec

    if not (run / "checkpoints").is_dir():
        build_trainer(resolve_spec(**spec_kw), data, run).fit()
    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="bench grid YAML (a builtin fashion-mnist dataset)")
    p.add_argument("--out", required=True, help="the grid's bench folder (poisoned sets are made there if missing)")
    p.add_argument("--attack", required=True, help="attack label of the grid to score")
    p.add_argument("--work", required=True, help="folder for the trusted data and the scoring models")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--trusted-size", type=int, default=2000)
    p.add_argument("--trusted-epochs", type=int, default=30)
    p.add_argument("--warmup-epochs", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from clipguard.bench.cache import BenchCache
    from clipguard.bench.config import load_config
    from clipguard.bench.detect import column_masks, detector_label, resolved_options
    from clipguard.bench.plan import plan_cells
    from clipguard.data.csv_dataset import load_csv
    from clipguard.detection.base import build
    from clipguard.detection.metrics import grouped_metrics
    from clipguard.detection.runner import encode_pairs
    from clipguard.evaluation.runner import load_model
    from clipguard.io import write_json
    from clipguard.models.factory import create_model as _create
    from clipguard.models.factory import get_tokenizer, image_size

    cfg = load_config(args.config, args.overrides)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = BenchCache(cfg, out)
    cells = [c for c in plan_cells(cfg)
             if c.attack.label == args.attack and c.stage == "pretrain" and c.defense.defense == "none"
             and c.defense.detect is None and c.defense.data == "train" and c.defense.preset is None]
    if not cells:
        raise SystemExit(f"no plain-CLIP pre-training cell of attack '{args.attack}' in {args.config}")
    other = sorted({c.dataset.label for c in cells if c.dataset.builtin != "fashion-mnist"})
    if other:  # the trusted rows are drawn from the Fashion-MNIST pool (its CSV layout is known)
        raise SystemExit(f"datasets {other} are not the builtin fashion-mnist; this benchmark draws its "
                         "trusted rows from that pool only")
    train_kw = {"model": cfg.model, "batch_size": 128, "lr": 1e-3, "warmup": 50, "device": "cpu", "quiet": True}
    size = image_size(_create(cfg.model))
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    trusted_run = None
    for cell in cells:
        data, poison = cache.train_data(cell.dataset, cell.attack, cell.seed)
        if trusted_run is None:
            grid_train = out / "data" / cell.dataset.label / "train.csv"
            tcsv = trusted_csv(grid_train, args.trusted_size, cell.dataset.data_seed, work)
            trusted_run = train({"defense": "none", "train": {**train_kw, "epochs": args.trusted_epochs, "seed": 0}},
                                load_csv(tcsv, image_size=size), work / f"trusted{args.trusted_size}")
        warm = train({"defense": "safeclip", "options": {"warmup_epochs": args.warmup_epochs},
                      "train": {**train_kw, "epochs": args.warmup_epochs + 2, "stop_after": args.warmup_epochs,
                                "seed": cell.seed}},
                     data, work / f"warmup{args.warmup_epochs}-{cell.attack.label}-seed{cell.seed}")
        models = {"trusted": trusted_run, "warm-up": warm}
        poisoned = cell.run_dir(out)
        if (poisoned / "checkpoints").is_dir():
            models = {"poisoned": poisoned, **models}
        parts = column_masks(cfg, cell, poison)
        for model_name, run in models.items():
            net, arch = load_model(str(run), cfg.model, "cpu")
            feats = encode_pairs(net, get_tokenizer(arch), data, device="cpu", progress=False)
            for name, opts in DETECTORS:
                scores = build(name, opts).score(feats)
                per_part = grouped_metrics(scores, poison.mask.numpy(), parts)["parts"]
                row = results.setdefault(model_name, {}).setdefault(
                    detector_label(name, resolved_options(name, opts)), {})
                for col, m in per_part.items():
                    row.setdefault(col, []).append(float(m["auroc"]))

    seeds = [c.seed for c in cells]
    over = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds[0]})"
    print(f"AUROC (%) per attack part, {over}; {args.attack} of {cfg.name}")
    for model_name, dets in results.items():
        print(f"\nscored by the {model_name} model")
        for det, cols in dets.items():
            print(f"  {det:<28}" + "   ".join(f"{col.split(':')[-1]} {auroc_cell(v)}" for col, v in cols.items()))
    if args.json:
        write_json(args.json, {"config": str(args.config), "attack": args.attack, "seeds": seeds,
                               "trusted_size": args.trusted_size, "trusted_epochs": args.trusted_epochs,
                               "warmup_epochs": args.warmup_epochs, "auroc": results,
                               "mean": {m: {d: {c: float(np.mean(v)) for c, v in cols.items()}
                                            for d, cols in dets.items()} for m, dets in results.items()}})


def auroc_cell(values: list[float]) -> str:
    """AUROCs (fractions) over seeds as printed: mean ± std in %, or the value alone for one seed
    (a spread of one value would read as a measured 0)."""
    mean = f"{100 * statistics.mean(values):5.1f}"
    return mean if len(values) == 1 else f"{mean} ± {100 * statistics.stdev(values):4.1f}"


if __name__ == "__main__":
    main()
