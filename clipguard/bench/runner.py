"""Run a grid: plan the cells, skip the finished ones, run the rest, merge, report.

Resumable by construction: a finished cell is a JSON under ``OUT/cells`` (skipped on the next
run); an interrupted cell has checkpoints in its run folder and continues from the last one.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from clipguard.bench.cache import BenchCache
from clipguard.bench.cell import cell_config, fingerprint, is_done, read_cell, run_cell
from clipguard.bench.config import BenchConfig, validate_names
from clipguard.bench.plan import Cell, plan_cells
from clipguard.io import write_json


def plan_record(cfg: BenchConfig, cells: list[Cell]) -> dict[str, Any]:
    return {"name": cfg.name, "config": cfg.source, "cells": [
        {"cell": c.id, "method": c.method, "stage": c.stage, "dataset": c.dataset.label,
         "attack": c.attack.label, "seed": c.seed, "fingerprint": fingerprint(cell_config(cfg, c))}
        for c in cells]}


def _detection_summary(det: dict[str, Any]) -> str:
    values = {name: (d.get("metrics") or {}).get("auroc") for name, d in det["detectors"].items()}
    aurocs = ", ".join(f"{name}={v:.3f}" for name, v in values.items() if v is not None)
    text = f"AUROC {aurocs}" if aurocs else ""
    keep = det.get("keep")
    if keep:
        text += (", " if text else "") + f"kept {keep['kept']}/{det['n_pairs']}"
        if keep.get("poisons") is not None:
            text += f" ({keep['poisons_kept']}/{keep['poisons']} poisons)"
    return text


def _summary(rec: dict[str, Any]) -> str:
    if rec.get("stage") == "scan":
        return f"[{rec['cell']}] {_detection_summary(rec['detection'])} ({rec['timings']['detect_s']:.0f}s scan)"
    m = rec["metrics"]
    asr = ", ".join(f"{a['column']}={a['headline']['value']:.3f}" for a in rec["asr"]
                    if a["headline"].get("value") is not None)
    return (f"[{rec['cell']}] zero-shot {m['zeroshot_top1']:.3f}"
            + (f", linear probe {m['linear_probe_top1']:.3f}" if "linear_probe_top1" in m else "")
            + (f", {'base rate' if rec.get('train_data') == 'clean' else 'ASR'} {asr}" if asr else "")
            + (f", {_detection_summary(rec['detection'])}" if rec.get("detection") else "")
            + f" ({rec['timings']['train_wall_s']:.0f}s train)")


_WORKER_CACHE: dict[str, BenchCache] = {}
_WORKER_SLOT = 0  # this worker's number: its per-run progress bar gets its own terminal line


def _worker_init(parent: int, counter) -> None:
    """Workers end with their parent: a killed ``clipguard bench`` must not leave cells training
    (and writing into the bench folder) in the background."""
    import os
    import threading

    global _WORKER_SLOT
    with counter.get_lock():
        _WORKER_SLOT = counter.value
        counter.value += 1

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker_cell(cfg: BenchConfig, out: str, cell_id: str, threads: int, quiet: bool) -> dict[str, Any]:
    """One cell in a worker process (``--jobs``): its own threads, a cache kept across its cells,
    its epoch bar on its own line below the overall bar."""
    import torch

    torch.set_num_threads(threads)
    cell = next(c for c in plan_cells(cfg) if c.id == cell_id)
    cache = _WORKER_CACHE.setdefault(out, BenchCache(cfg, Path(out)))
    return run_cell(cfg, cell, Path(out), cache, quiet=quiet, evaluate=True, bar_position=1 + _WORKER_SLOT)


def _worker_pool(workers: int):
    """(a pool of ``workers`` spawned processes that exit with this one, the threads each gets:
    cores / workers), for the cells and for the poisoned sets alike."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(), ctx.Value("i", 0)))
    return pool, max(1, (os.cpu_count() or 1) // workers)


def _run_parallel(cfg: BenchConfig, out: Path, cells: list[Cell], jobs: int, bar, ran: list[str],
                  quiet: bool) -> None:
    """Cells in ``jobs`` worker processes (each with cores/jobs threads); a fine-tuning, detect-then-
    train or scan-only cell starts once its pre-trained base is finished. On a tiny model, processes use the cores better than
    threads (a step is many small ops), so ``--jobs 2`` is the faster way to fill 2 cores."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from clipguard.bench.schedule import CellQueue

    queue = CellQueue(cfg, out, cells)  # bases first; a cell starts once its base is finished
    pool, threads = _worker_pool(jobs)
    with pool:
        running: dict[Any, Cell] = {}
        while queue or running:
            for c in queue.take(jobs - len(running)):
                running[pool.submit(_worker_cell, cfg, str(out), c.id, threads, quiet)] = c
            if not running:
                raise RuntimeError(f"bench: cells wait for a base that will not run: {[c.id for c in queue.pending]}")
            try:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
            except BaseException:  # Ctrl-C: stop the workers now, not after their cells
                _stop(pool)
                raise
            for fut in finished:
                cell = running.pop(fut)
                try:
                    rec = fut.result()
                except BaseException:
                    _stop(pool)
                    raise
                ran.append(cell.id)
                bar.update(1)
                if not quiet:
                    tqdm.write(_summary(rec))


def _worker_poison(cfg: BenchConfig, out: str, dataset: str, attack: str, seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    ds = next(d for d in cfg.datasets if d.label == dataset)
    spec = next(a for a in cfg.attacks if a.label == attack)
    BenchCache(cfg, Path(out)).write_poisoned(ds, spec, seed)


def _poison_parallel(cfg: BenchConfig, out: Path, cache: BenchCache, needed: list, jobs: int) -> None:
    """Make the poisoned sets in ``jobs`` worker processes before any cell starts: poisoning is
    single-threaded work (decoding and writing images), and a 60,000-pair set with five chained
    parts takes about a minute, so a grid of many sets would otherwise hold every core but one
    idle. Each set goes to its own folder and depends only on (dataset, attack, seed), so the
    files are the same in any order. The datasets themselves are made first, here: every set
    reads them."""
    from concurrent.futures import as_completed

    for ds in {d.label: d for d, _, _ in needed}.values():
        cache.split_paths(ds)
    todo = [(d, a, s) for d, a, s in needed if not a.clean]
    if len(todo) < 2:
        for d, a, s in todo:
            cache.write_poisoned(d, a, s)
        return
    pool, threads = _worker_pool(min(jobs, len(todo)))
    with pool:
        futures = [pool.submit(_worker_poison, cfg, str(out), d.label, a.label, s, threads) for d, a, s in todo]
        try:
            for fut in as_completed(futures):
                fut.result()
        except BaseException:
            _stop(pool)
            raise


def _stop(pool) -> None:
    for p in list(getattr(pool, "_processes", {}).values()):
        p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def run_bench(cfg: BenchConfig, out: str | Path, *, quiet: bool = False, redo: bool = False,
              report: bool = True, only: str | None = None, command: str | None = None,
              jobs: int = 1, submit=None) -> dict[str, Any]:
    """Run every unfinished cell in order, then write results.csv and the reports.

    ``only``: comma-separated substrings; a cell runs when its id contains one of them. ``redo``: forget the selected
    cells' results: a run folder made with the same config resumes (so only evaluation is redone),
    one made with a different config is deleted and retrained. ``jobs``: cells run at once, in
    worker processes (not under torchrun). ``submit``: a ``clipguard.bench.submit.SubmitOptions``:
    every cell runs as a submitit job, on SLURM or as a local process (failed cells are listed in
    the result's ``cells_failed`` and ``cells_not_run`` instead of stopping the grid)."""
    from clipguard.training.distributed import barrier, init_distributed

    out = Path(out)
    validate_names(cfg)
    dist = init_distributed(cfg.device)  # under torchrun: every rank trains, rank 0 prepares and evaluates
    main = dist.is_main
    backend = None
    if submit is not None:  # before any work: a missing submitit or srun stops here
        from clipguard.bench.submit import SubmititBackend

        backend = SubmititBackend.for_bench(submit, cfg, out, dist.world_size)
    cells = plan_cells(cfg)
    wanted = [w for w in (only or "").split(",") if w]
    todo = [c for c in cells if not wanted or any(w in c.id for w in wanted)]
    cache = BenchCache(cfg, out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "plan.json", plan_record(cfg, cells))
        if redo:
            for c in todo:
                c.json_path(out).unlink(missing_ok=True)
                marker = read_cell(c.run_dir(out) / "bench_cell.json")
                if marker is not None and marker.get("fingerprint") != fingerprint(cell_config(cfg, c)):
                    shutil.rmtree(c.run_dir(out))
    barrier(dist)
    t0 = time.perf_counter()
    done_before = [c for c in todo if is_done(cfg, c, out)]
    if main:  # shared steps first: datasets and every poisoned set the remaining cells need
        # (a clean cell also reads every poisoned attack's trigger set: its base-rate row)
        needed = {}
        for c in todo:
            if c in done_before:
                continue
            for a in ([x for x in cfg.attacks if not x.clean] if c.attack.clean else []) + [c.attack]:
                needed.setdefault((c.dataset.label, a.label, c.seed), (c.dataset, a, c.seed))
        if jobs > 1 and dist.world_size == 1 and backend is None:
            _poison_parallel(cfg, out, cache, list(needed.values()), jobs)
        else:
            for ds, attack, seed in needed.values():
                cache.poisoned(ds, attack, seed)
    barrier(dist)
    ran: list[str] = []
    meta = {"name": cfg.name, "config": cfg.source, "model": cfg.model, "seeds": cfg.seeds,
            "n_cells": len(cells), "command": command or " ".join(shlex.quote(a) for a in sys.argv),
            "world_size": dist.world_size, "jobs": jobs, "executor": "pool" if submit is None else submit.executor,
            **({"submit": submit.record()} if submit is not None else {})}
    bar = tqdm(total=len(todo), desc=f"bench {cfg.name}", position=0, dynamic_ncols=True,
               disable=quiet or not main, initial=len(done_before))
    try:
        if backend is not None:
            from clipguard.bench.submit import run_submitted

            left = [c for c in todo if c not in done_before and not is_done(cfg, c, out)]
            meta.update(run_submitted(cfg, out, left, backend, bar=bar, ran=ran, quiet=quiet))
        elif jobs > 1 and dist.world_size == 1:
            left = [c for c in todo if c not in done_before and not is_done(cfg, c, out)]
            _run_parallel(cfg, out, left, jobs, bar, ran, quiet)
        for cell in todo if backend is None else []:
            if cell in done_before or is_done(cfg, cell, out):
                continue
            bar.set_postfix_str(cell.id)
            rec = run_cell(cfg, cell, out, cache, quiet=quiet, evaluate=main)
            barrier(dist)
            ran.append(cell.id)
            bar.update(1)
            if rec is not None and not quiet:
                tqdm.write(_summary(rec))
        if main and backend is None:
            # clean-data cells finished before a column was added: its base rate, no retraining
            # (every clean cell of a dataset and seed the selection touches)
            from clipguard.bench.base_rates import top_up_base_rates

            touched = {(c.dataset.label, c.seed) for c in todo}
            clean_done = [c for c in cells if c.attack.clean and (c.dataset.label, c.seed) in touched
                          and is_done(cfg, c, out)]
            top = top_up_base_rates(cfg, out, cache, clean_done)
            meta["base_rates_added"], meta["base_rates_skipped"] = top["added"], top["skipped"]
            if top["added"] and not quiet:
                tqdm.write(f"base rates of new columns measured on {len(top['added'])} clean-data model(s)")
        barrier(dist)
    finally:
        bar.close()
        meta.update({"wall_s": round(time.perf_counter() - t0, 1), "cells_run": len(ran),
                     "cells_skipped": len(done_before)})
        if main:
            write_json(out / "bench.json", meta)
            if report:
                from clipguard.reporting.report import write_report

                write_report(out)
    return meta
