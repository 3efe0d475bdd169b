"""A backdoor the defender plants itself ("canary") as the yardstick of a fine-tuning recipe.

A defender cannot measure how much of an unknown backdoor a recipe removes, so the recipe cannot
be chosen on its attack success rate. Drift (``benchmarks/finetune_drift.py``, the rule behind
``--lr-search``) measures how far a recipe moves the model instead; across PAR's variants, which
all push to about the same distance, it does not tell them apart (docs/finetuning.md, round 6).
This measures something closer to the question: plant a backdoor of your own into the model you
were given, clean that model with each recipe, and see how much of YOUR backdoor is left.

Per seed of a ``split: val`` bench folder that has a poisoned pre-trained CLIP cell:

1. the clean pairs the grid's fine-tuning cells train on (the bench's held-aside rows) as a CSV;
2. two canaries poisoned into them with ``clipguard poison``: BadNet (its default patch and
   place) and Blended (alpha 0.2), 100 injected pairs each, trigger seeds ``--canary-seeds`` and
   each target class drawn from the classes by ``random.Random(seed)``: the defender's choices,
   fixed before anything is measured;
3. the implant: ``clipguard finetune --defense ft --lr 1e-3 --epochs 10`` from the poisoned model
   on the clean and canary pairs together;
4. every recipe (``NAME=ARGS``, the arguments of ``clipguard finetune``) from the implanted model
   on the clean pairs alone, then ``clipguard evaluate`` on the validation rows: zero-shot and
   each canary's ASR@1.

Runs are reused when their folder exists (delete ``--work`` to start over). With ``--real`` the
table also shows the bench cell's own ASR@1 against the real attacks, for reading after a choice
(a recipe's cell is found by ``NAME`` = the bench method after ``CLIP+``).

    .venv/bin/python benchmarks/finetune_canary.py runs/finetune-val --config configs/finetune-select.yaml \\
        --seeds 4 5 --work runs/canary --recipe "FT=--defense ft" --recipe "PAR=--defense par" --real
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from clipguard.training.canary import DEFAULT_TRIGGER_SEEDS

CLI = [sys.executable, "-m", "clipguard.cli"]
CANARY_COUNT = 100


def _run(args: list[str], log: Path) -> None:
    """One clipguard command on one thread (so a rerun gives the same figures)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        done = subprocess.run(CLI + args, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"failed (see {log}): clipguard {shlex.join(args)}")


def clean_pairs_csv(config: Path, out: Path, dest: Path, dataset: str | None = None) -> tuple[Path, Path, Path, str]:
    """(the held-aside clean pairs as a CSV, the grid's evaluation rows, classes.json, the dataset's
    label) of the grid's dataset ``dataset`` (by default its only one)."""
    from clipguard.bench.cache import BenchCache
    from clipguard.bench.config import load_config
    from clipguard.data.csv_dataset import CsvSpec, read_rows, write_csv

    cfg = load_config(config)
    found = [d for d in cfg.datasets if dataset in (None, d.label)]
    if len(found) != 1:
        raise SystemExit(f"{config}: expected one dataset{f' {dataset!r}' if dataset else ''}, found {len(found)}")
    ds = found[0]
    cache = BenchCache(cfg, out)
    data = cache.finetune_clean(ds)
    _, val_csv, classes = cache.split_paths(ds)
    if not dest.exists():
        spec = CsvSpec(img_key=ds.img_key, caption_key=ds.caption_key, label_key=ds.label_key,
                       separator=ds.separator, allow_outside_root=True)
        header, rows = read_rows(data.source, spec)
        root = Path(data.source).parent  # the copy lives elsewhere: its images by absolute path
        picked = [rows[line - 2] for line in data.rows]  # line 1: the header
        picked = [{**r, ds.img_key: str((root / r[ds.img_key].strip()).resolve())} for r in picked]
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_csv(dest, picked, header, ds.separator)
    return dest, Path(val_csv), Path(classes), ds.label


def canary_targets(classes: Path, seeds: list[int]) -> list[str]:
    """The targets ``clipguard finetune --select canary`` draws (clipguard.training.canary)."""
    from clipguard.data.classes import ClassInfo
    from clipguard.training.canary import canary_targets as draw

    return draw(list(ClassInfo.load(classes).classes), seeds)


def evaluate(run: Path, data: Path, classes: Path, manifests: list[Path], work: Path,
             keys: list[str] | None = None, prefix: str = "eval") -> dict[str, float]:
    """Zero-shot and each manifest's ASR@1 (in %) of the run on ``data``, evaluated once each into
    ``work/<prefix>-<run>-<key>.json``; ``keys`` name the ASR entries (default: canary0, canary1)."""
    keys = keys or [f"canary{i}" for i in range(len(manifests))]
    got: dict[str, float] = {}
    for key, manifest in zip(keys, manifests):
        tag = key.removeprefix("canary")  # the canaries' files keep their first names
        res = work / f"{prefix}-{run.name}-{tag}.json"
        if not res.exists():
            _run(["evaluate", "--checkpoint", str(run), "--data", str(data), "--classes", str(classes),
                  "--attack-manifest", str(manifest), "--allow-outside-root", "--out", str(res)],
                 work / f"{prefix}-{run.name}-{tag}.log")
        m = json.loads(res.read_text())["metrics"]
        got["zeroshot"] = 100 * m["zeroshot"]["acc1"]
        got[key] = 100 * m["attack"]["zeroshot"]["asr@1"]
    return got


def finetune(name: str, checkpoint: Path, data: Path, args: list[str], work: Path, model: str) -> Path:
    run = work / name
    if not (run / "checkpoints").exists():
        _run(["finetune", "--checkpoint", str(checkpoint), "--model", model, "--data", str(data),
              "--allow-outside-root", "--out", str(run), "--device", "cpu", "--quiet", "--overwrite", *args],
             work / f"{name}.log")
    return run


def real_asr(out: Path, name: str, seed: int) -> dict[str, float]:
    hits = list((out / "cells").glob(f"*__CLIP+{name}__seed{seed}.json"))
    if not hits:
        return {}
    cell = json.loads(hits[0].read_text())
    return {a["column"]: 100 * a["headline"]["value"] for a in cell["asr"] if a["headline"].get("value") is not None}


def _mean_std(v: list[float]) -> str:
    return f"{statistics.mean(v):5.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:4.1f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a split: val bench folder with poisoned CLIP cells")
    p.add_argument("--config", type=Path, required=True, help="the bench config that wrote it")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--work", type=Path, required=True, help="where the canary runs go")
    p.add_argument("--recipe", action="append", required=True, metavar="NAME=ARGS",
                   help="a recipe: its name and the arguments of `clipguard finetune` (repeatable)")
    p.add_argument("--canary-seeds", type=int, nargs=2, default=list(DEFAULT_TRIGGER_SEEDS), metavar=("BADNET", "BLENDED"))
    p.add_argument("--attack", default="three", help="the bench attack whose poisoned CLIP is cleaned")
    p.add_argument("--model", default="cg-nano")
    p.add_argument("--real", action="store_true", help="also print each cell's ASR@1 on the real attacks")
    a = p.parse_args(argv)
    recipes = []
    for item in a.recipe:
        name, eq, args = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"--recipe {item!r}: expected NAME=ARGS")
        recipes.append((name, shlex.split(args)))

    clean, val, classes, label = clean_pairs_csv(a.config, a.out, a.work / "clean.csv")
    targets = canary_targets(classes, a.canary_seeds)
    print(f"canaries: badnet -> {targets[0]} (trigger seed {a.canary_seeds[0]}), "
          f"blended -> {targets[1]} (trigger seed {a.canary_seeds[1]})")
    rows: list[dict[str, Any]] = []
    for seed in a.seeds:
        work = a.work / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        start = a.out / "runs" / label / a.attack / f"seed{seed}" / "pretrain-CLIP"
        dirs = [work / "canary-badnet", work / "canary-blended"]
        source = clean
        for (attack, opts), d, trig, target in zip([("badnet", []), ("blended", ["--opt", "alpha=0.2"])], dirs,
                                                   a.canary_seeds, targets):
            if not (d / "manifest.json").exists():
                _run(["poison", "--data", str(source), "--attack", attack, "--target", target, "--count",
                      str(CANARY_COUNT), "--seed", str(seed), "--trigger-seed", str(trig), *opts,
                      "--eval-data", str(val), "--classes", str(classes), "--out", str(d),
                      "--allow-outside-root"], work / f"{d.name}.log")
            source = d / "train.csv"
        manifests = [d / "manifest.json" for d in dirs]
        implant = finetune("implant", start, source, ["--defense", "ft", "--lr", "1e-3", "--epochs", "10"],
                           work, a.model)
        rows.append({"seed": seed, "recipe": "implanted", **evaluate(implant, val, classes, manifests, work)})
        for name, args in recipes:
            run = finetune(name, implant, clean, args, work, a.model)
            rows.append({"seed": seed, "recipe": name, **evaluate(run, val, classes, manifests, work),
                         **({"real": real_asr(a.out, name, seed)} if a.real else {})})
    from clipguard.io import write_json

    write_json(a.work / "canary.json", rows, digits=None)
    print(f"{'recipe':24s} {'zero-shot':>12s} {'badnet canary':>16s} {'blended canary':>16s}")
    for name in ["implanted", *[n for n, _ in recipes]]:
        rs = [r for r in rows if r["recipe"] == name]
        line = f"{name:24s} " + " ".join(f"{_mean_std([r[k] for r in rs]):>{w}s}" for k, w in
                                         (("zeroshot", 12), ("canary0", 16), ("canary1", 16)))
        per = " / ".join(f"{r['canary0']:.1f}, {r['canary1']:.1f}" for r in rs)
        real = [r.get("real") for r in rs if r.get("real")]
        if real:
            keys = sorted(real[0])
            line += "   real: " + ", ".join(f"{k} {statistics.mean(x[k] for x in real):.1f}" for k in keys)
        print(line + f"   (per seed: {per})")


if __name__ == "__main__":
    main()
