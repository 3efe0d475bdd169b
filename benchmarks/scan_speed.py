"""Wall time of ``clipguard scan`` on a BadNet-poisoned Fashion-MNIST set, phase by phase.

Builds N Fashion-MNIST pairs (default 60,000: Debian's whole training split), poisons 1% of them
with BadNet (replacing rows, so the scan sees exactly N pairs), saves a cg-tiny checkpoint
(random init by default: the time does not depend on the weights, only the scores do), then
runs ``clipguard.detection.scan`` end to end with every default detector and prints seconds per
phase against the 120 s target (issue 12):

  load      the checkpoint and the decoded dataset
  encode    every image and caption once (scan.json: encode.seconds)
  knn       the exact neighbour search, once per (space, metric) (scan.json: knn_seconds)
  <name>    each detector's own work (scan.json: detectors.<name>.seconds)
  write     scores.csv, kept.csv + kept_images/, suspicious.csv, plots
  other     the rest: metrics against the manifest, bookkeeping, scan.json

Data, poisoned copy and checkpoint are built before the clock starts; with ``--workdir`` they
are reused by later runs.

    .venv/bin/python benchmarks/scan_speed.py --pairs 2000
    .venv/bin/python benchmarks/scan_speed.py --pairs 60000 --workdir /tmp/scan-speed --keep --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

TARGET_S = 120.0
TARGET_PAIRS = 60_000


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare(work: Path, pairs: int, model: str, train_epochs: int, seed: int, quiet: bool) -> tuple[Path, Path, Path]:
    """(poisoned train.csv, its manifest, checkpoint folder), built in ``work`` unless already there."""
    import clipguard
    from clipguard.models.checkpoint import save_checkpoint
    from clipguard.models.factory import create_model

    fm = work / f"fm-{pairs}-s{seed}"
    poisoned = work / f"badnet-{pairs}-s{seed}"
    if not (poisoned / "manifest.json").is_file():
        if not (fm / "train.csv").is_file():
            clipguard.fashion_mnist(fm, train_size=pairs, test_size=100, seed=seed)
        clipguard.poison(fm / "train.csv", "badnet", target="bag", rate=0.01, seed=seed, out=poisoned,
                         mode="replace", overwrite=True)
    ck = work / f"ck-{model}-e{train_epochs}-s{seed}"
    if not ck.exists():
        if train_epochs > 0:
            clipguard.train(poisoned / "train.csv", ck, model=model, epochs=train_epochs, seed=seed,
                            device="cpu", quiet=quiet)
        else:
            save_checkpoint(ck, create_model(model, seed=seed), state={"model": model})
    return poisoned / "train.csv", poisoned / "manifest.json", ck


@contextlib.contextmanager
def phase_clocks() -> Iterator[dict[str, float]]:
    """Seconds spent in the scan's loading and writing steps, which scan.json does not time: the
    functions ``scan`` looks up at call time, wrapped for the duration."""
    import clipguard.data.registry as registry
    import clipguard.detection.outputs as outputs
    import clipguard.evaluation.runner as runner

    spent = {"load": 0.0, "write": 0.0}
    saved = [(registry, "load_dataset", "load"), (runner, "load_model", "load"), (outputs, "write_all", "write")]
    originals = [getattr(mod, name) for mod, name, _ in saved]

    def timed(fn, phase):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[phase] += time.perf_counter() - t0
        return wrapper

    for (mod, name, phase), fn in zip(saved, originals):
        setattr(mod, name, timed(fn, phase))
    try:
        yield spent
    finally:
        for (mod, name, _), fn in zip(saved, originals):
            setattr(mod, name, fn)


def phases_from(summary: dict[str, Any], clocks: dict[str, float], wall: float) -> list[tuple[str, float]]:
    """(phase, seconds) rows: scan.json's own timings, the wrapped load/write, the remainder."""
    rows = [("load (model + data)", clocks["load"]), ("encode", summary["encode"]["seconds"])]
    searches: dict[tuple[str, str], float] = {}
    for rec in summary["detectors"].values():
        opt = rec["options"]
        if rec["knn_seconds"] > 0:
            searches[(opt.get("space", "image"), opt.get("metric", "l2"))] = rec["knn_seconds"]
    rows += [(f"neighbour search ({space}, {metric})", s) for (space, metric), s in searches.items()]
    rows += [(f"detector {name}", rec["seconds"]) for name, rec in summary["detectors"].items()]
    rows.append(("write outputs", clocks["write"]))
    rows.append(("other (metrics, scan.json)", max(0.0, wall - sum(s for _, s in rows))))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=TARGET_PAIRS, help="pairs scanned (at most 60000: Fashion-MNIST's "
                   "training split); 1%% of them BadNet poisons")
    p.add_argument("--model", default="cg-tiny")
    p.add_argument("--train-epochs", type=int, default=0,
                   help="train the model this many epochs on the poisoned data first (default 0: random init)")
    p.add_argument("--detectors", default=None, help="comma-separated (default: every detector)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256, help="scan --batch-size")
    p.add_argument("--chunk", type=int, default=4096, help="scan --chunk")
    p.add_argument("--neighbour-search", default="exact", choices=["exact", "ivf"], help="scan --neighbour-search")
    p.add_argument("--no-manifest", action="store_true", help="scan without the attack manifest (no metrics, plots)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where data, checkpoint and scan go (reused by later runs; "
                   "default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    p.add_argument("--progress", action="store_true", help="show the scan's progress bars")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not 1 <= args.pairs <= 60_000:
        p.error(f"--pairs must be in [1, 60000], got {args.pairs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from clipguard.detection import scan

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="scan-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data, manifest, ck = prepare(work, args.pairs, args.model, args.train_epochs, args.seed, not args.progress)
        prep_s = time.perf_counter() - t0
        with phase_clocks() as clocks:
            t0 = time.perf_counter()
            summary = scan(data, ck, work / "scan", model=args.model, detectors=args.detectors,
                           attack_manifest=None if args.no_manifest else manifest, overwrite=True,
                           device=args.device, batch_size=args.batch_size, chunk=args.chunk,
                           progress=args.progress, search={"method": args.neighbour_search})
            wall = time.perf_counter() - t0
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    n = summary["n_pairs"]
    rows = phases_from(summary, clocks, wall)
    weights = "random init" if args.train_epochs == 0 else f"trained {args.train_epochs} epoch(s)"
    res: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "device": summary["device"], "torch": torch.__version__, "clipguard": summary["clipguard_version"],
        "argv": list(argv) if argv is not None else sys.argv[1:], "model": summary["model"], "weights": weights,
        "pairs": n, "poisoned": summary.get("n_poisoned"), "detectors": list(summary["detectors"]),
        "batch_size": args.batch_size, "chunk": args.chunk, "prepare_seconds": prep_s,
        "neighbour_search": summary["neighbour_search"],
        "phases": {name: s for name, s in rows}, "total_seconds": wall, "pairs_per_s": n / wall,
        "target_seconds": TARGET_S, "target_pairs": TARGET_PAIRS, "within_target": wall <= TARGET_S,
        "auroc": {k: v["metrics"]["auroc"] for k, v in summary["detectors"].items() if "metrics" in v},
        "workdir": str(work) if (args.workdir or args.keep) else None,
    }

    print(f"clipguard scan: {n} pairs ({res['poisoned'] or 0} BadNet poisons), {res['model']} ({weights}; "
          f"the timing does not depend on the weights), {res['device']}, {res['threads']} threads, {res['cpu']}")
    print(f"detectors: {', '.join(res['detectors'])}; data and checkpoint prepared in {prep_s:.1f} s (not timed)")
    print(f"\n{'phase':<34} {'seconds':>9} {'share':>7} {'pairs/s':>10}")
    for name, s in rows:
        print(f"{name:<34} {s:9.2f} {s / wall:7.1%} {n / s if s > 0 else float('inf'):10.0f}")
    print(f"{'total (end to end)':<34} {wall:9.2f} {1:7.1%} {n / wall:10.0f}")
    verdict = "within" if wall <= TARGET_S else "OVER"
    scale = "" if n == TARGET_PAIRS else f" (target is for {TARGET_PAIRS} pairs; this run has {n})"
    print(f"\ntarget: {TARGET_PAIRS} pairs in <= {TARGET_S:.0f} s: {wall:.1f} s, {verdict} the target{scale}")
    if res["workdir"]:
        print(f"files kept in {res['workdir']}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
