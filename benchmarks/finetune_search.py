"""The defender's rule end to end on a test grid: ``clipguard finetune --lr-search`` per seed.

The library's fine-tuning recipe is fixed per model; ``--lr-search`` instead applies the rule to
the model and clean set in hand (docs/finetuning.md#choosing-the-learning-rate-on-your-own-model).
This measures that rule where the fixed recipe was not chosen, as a defender would run it:

1. the grid's held-aside clean pairs (the defender's data) are split, by the seed, into the pairs
   to fine-tune on and ``--val-fraction`` of them as the defender's own validation rows;
2. ``clipguard finetune --lr-search LRS`` (canaries by default) from the grid's poisoned CLIP of
   that seed, with the learning rates given here, fixed before anything runs;
3. the chosen model is evaluated once on the grid's test rows: zero-shot and every attack
   part's ASR@1, beside the poisoned model's cell.

Runs are reused when their folder exists (delete ``--work`` to start over).

    BADCLIP_SURROGATE=... python benchmarks/finetune_search.py runs/ft-defaults \\
        --config configs/finetune-defaults.yaml --dataset fmnist-ft1k --attack five --seeds 1 2 3 \\
        --work runs/search-ft1k --defense par --lrs 1e-5,3e-5,1e-4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_canary import _run, clean_pairs_csv, evaluate  # noqa: E402


def split_clean(clean: Path, work: Path, seed: int, fraction: float) -> tuple[Path, Path]:
    """(pairs to fine-tune on, the defender's validation rows): a seeded split of the clean pairs."""
    from clipguard.data.csv_dataset import CsvSpec, read_rows, write_csv

    fit, val = work / "fit.csv", work / "val.csv"
    if not (fit.is_file() and val.is_file()):
        header, rows = read_rows(clean, CsvSpec(allow_outside_root=True))
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(fraction * len(rows)))
        write_csv(val, [rows[i] for i in sorted(order[:n_val])], header)
        write_csv(fit, [rows[i] for i in sorted(order[n_val:])], header)
    return fit, val


def poisoned_cell(out: Path, dataset: str, attack: str, seed: int) -> dict[str, float]:
    cell = json.loads((out / "cells" / f"{dataset}__{attack}__CLIP__seed{seed}.json").read_text())
    got = {"zeroshot": 100 * cell["metrics"]["zeroshot_top1"]}
    got.update({a["column"]: 100 * a["headline"]["value"] for a in cell["asr"]})
    return got


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a finished test-split bench folder with poisoned CLIP cells")
    p.add_argument("--config", type=Path, required=True, help="the bench config that wrote it")
    p.add_argument("--dataset", default=None, help="the grid's dataset (default: its only one)")
    p.add_argument("--attack", required=True, help="the bench attack whose poisoned CLIP is cleaned")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--defense", required=True)
    p.add_argument("--lrs", required=True, help="the candidate learning rates, e.g. 1e-5,3e-5,1e-4")
    p.add_argument("--val-fraction", type=float, default=0.2, help="clean pairs kept as the defender's validation")
    p.add_argument("--select", default="canary", choices=["canary", "drift"])
    p.add_argument("--model", default="cg-nano")
    a = p.parse_args(argv)
    if not 0 < a.val_fraction < 1:
        raise SystemExit(f"--val-fraction must be in (0, 1), got {a.val_fraction}")

    a.work.mkdir(parents=True, exist_ok=True)
    clean, test, classes, label = clean_pairs_csv(a.config, a.out, a.work / "clean.csv", a.dataset)
    rows: list[dict[str, Any]] = []
    for seed in a.seeds:
        work = a.work / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        fit, val = split_clean(clean, work, seed, a.val_fraction)
        start = a.out / "runs" / label / a.attack / f"seed{seed}" / "pretrain-CLIP"
        run = work / a.defense
        if not (run / "lr-search.json").is_file():
            _run(["finetune", "--checkpoint", str(start), "--model", a.model, "--data", str(fit),
                  "--eval-data", str(val), "--classes", str(classes), "--allow-outside-root",
                  "--defense", a.defense, "--lr-search", a.lrs, "--select", a.select, "--seed", str(seed),
                  "--device", "cpu", "--quiet", "--out", str(run)], work / f"{a.defense}.log")
        search = json.loads((run / "lr-search.json").read_text())
        manifests = sorted((a.out / "poison" / label / a.attack / f"seed{seed}").glob("part*/manifest.json"))
        names = [m.parent.name.split("-")[1] for m in manifests]  # part<i>-<attack>-<hash>
        rows.append({"seed": seed, "chosen_lr": search["chosen"]["lr"], "search": search,
                     "test": evaluate(run, test, classes, manifests, work, keys=names, prefix="test"),
                     "poisoned": poisoned_cell(a.out, label, a.attack, seed)})
    from clipguard.io import write_json

    write_json(a.work / f"search-{a.defense}.json", rows, digits=None)
    keys = [k for k in rows[0]["test"] if k != "zeroshot"]
    print(f"{a.defense}: lr-search {a.lrs} ({a.select}) on {1 - a.val_fraction:.0%} of the clean pairs; test split")
    for r in rows:
        d = r["test"]["zeroshot"] - r["poisoned"]["zeroshot"]
        print(f"  seed {r['seed']}: lr {r['chosen_lr']:g} ({r['search']['why']}), zero-shot {r['test']['zeroshot']:.1f} "
              f"({d:+.1f}), " + ", ".join(f"{k} {r['test'][k]:.1f} (from {r['poisoned'].get(k, float('nan')):.1f})"
                                          for k in keys))

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"

    print("  mean: zero-shot " + ms([r["test"]["zeroshot"] for r in rows]) + " vs poisoned "
          + f"{statistics.mean(r['test']['zeroshot'] - r['poisoned']['zeroshot'] for r in rows):+.1f}, "
          + ", ".join(f"{k} {ms([r['test'][k] for r in rows])}" for k in keys))


if __name__ == "__main__":
    main()
