"""``clipguard bench CONFIG.yaml --out DIR``: run (or resume) a benchmark grid and report it."""

from __future__ import annotations

import argparse
import sys

# --slurm-* flag -> SubmitOptions field (names after submitit's AutoExecutor parameters)
SLURM_FLAGS = {"slurm_partition": "partition", "slurm_time": "timeout_min", "slurm_nodes": "nodes",
               "slurm_gpus_per_node": "gpus_per_node", "slurm_tasks_per_node": "tasks_per_node",
               "slurm_cpus_per_task": "cpus_per_task", "slurm_mem": "mem_gb",
               "slurm_array_parallelism": "array_parallelism", "slurm_additional": "additional",
               "slurm_setup": "setup"}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a grid of datasets x attacks x defences x seeds (resumable)")
    p.add_argument("config", help="grid YAML (see configs/demo.yaml, docs/benchmarks.md)")
    p.add_argument("--out", required=True, help="bench folder; re-running with the same one resumes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set datasets.cc3m.train=/data/cc3m.csv")
    p.add_argument("--only", default=None, help="run only cells whose id contains one of these comma-separated texts")
    p.add_argument("--redo", action="store_true", help="forget finished cells: re-evaluate them, retrain those whose config changed")
    p.add_argument("--report-only", action="store_true", help="just rebuild results.csv and the reports")
    p.add_argument("--plan", action="store_true", help="print the cells and whether they are done; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once in worker processes, each with cores/JOBS threads (default 1); "
                        "with --executor local: local jobs at once")
    p.add_argument("--executor", choices=["pool", "local", "slurm"], default="pool",
                   help="pool (default): this process and its --jobs workers; slurm: every cell a SLURM job "
                        "through submitit (pip install 'clipguard[slurm]'); local: every cell a local process "
                        "through submitit's LocalExecutor (docs/scale.md)")
    g = p.add_argument_group("submitted jobs (--executor slurm or local; submitit's AutoExecutor parameters)")
    g.add_argument("--slurm-partition", metavar="P", help="SLURM partition")
    g.add_argument("--slurm-time", "--slurm-timeout-min", dest="slurm_time", type=int, metavar="MIN",
                   help="time limit of each cell's job in minutes (required on SLURM; a job that runs out is "
                        "requeued and resumes from its last epoch)")
    g.add_argument("--slurm-nodes", type=int, metavar="K", help="nodes per cell (default 1; >1: one multi-node DDP run)")
    g.add_argument("--slurm-gpus-per-node", type=int, metavar="G",
                   help="GPUs per node (default 0); one task per GPU unless --slurm-tasks-per-node says otherwise")
    g.add_argument("--slurm-tasks-per-node", type=int, metavar="T",
                   help="processes (DDP ranks) per node (default: the GPUs per node, at least 1)")
    g.add_argument("--slurm-cpus-per-task", type=int, metavar="C", help="CPUs per task")
    g.add_argument("--slurm-mem", "--slurm-mem-gb", dest="slurm_mem", metavar="SIZE",
                   help="memory per node: GB (64) or with a unit (64G, 500M)")
    g.add_argument("--slurm-array-parallelism", type=int, metavar="M",
                   help="at most M cells queued or running at once (default: no limit)")
    g.add_argument("--slurm-additional", action="append", metavar="KEY=VALUE",
                   help="extra '#SBATCH --KEY=VALUE' line (account=..., qos=..., constraint=...; a bare KEY is a flag); repeatable")
    g.add_argument("--slurm-setup", action="append", metavar="CMD",
                   help="shell line run in each job before the cell (module load ..., source .venv/bin/activate); repeatable")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    slurm = {field: getattr(args, flag) for flag, field in SLURM_FLAGS.items() if getattr(args, flag) is not None}
    return run_grid(args.config, args.out, overrides=args.overrides, only=args.only, redo=args.redo,
                    report_only=args.report_only, plan=args.plan, quiet=args.quiet, jobs=args.jobs,
                    executor=args.executor, slurm=slurm)


def submit_options(executor: str, slurm: dict | None, jobs: int):
    """The SubmitOptions of ``--executor slurm|local`` (None for the pool), validated; submitit
    must be installed."""
    from clipguard.errors import ConfigError

    slurm = dict(slurm or {})
    if executor == "pool":
        if slurm:
            flags = sorted("--" + k.replace("_", "-") for k, f in SLURM_FLAGS.items() if f in slurm)
            raise ConfigError(f"{', '.join(flags)}: only with --executor slurm or --executor local")
        return None
    from clipguard.bench.submit import SubmitOptions, import_submitit, parse_additional, parse_mem_gb

    if "mem_gb" in slurm:
        slurm["mem_gb"] = parse_mem_gb(slurm["mem_gb"])
    if "additional" in slurm and not isinstance(slurm["additional"], dict):
        slurm["additional"] = parse_additional(slurm["additional"])
    opts = SubmitOptions(executor=executor, jobs=jobs, **slurm)
    opts.validate()
    import_submitit()
    return opts


def run_grid(config: str, out: str, *, overrides: list[str] | None = None, only: str | None = None,
             redo: bool = False, report_only: bool = False, plan: bool = False, quiet: bool = False,
             command: str | None = None, jobs: int = 1, executor: str = "pool", slurm: dict | None = None) -> int:
    import os
    from pathlib import Path

    from clipguard.bench import load_config, plan_cells, run_bench, validate_names
    from clipguard.bench.cell import is_done
    from clipguard.errors import ConfigError
    from clipguard.reporting import terminal_tables, write_report

    cfg = load_config(config, overrides)
    validate_names(cfg)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    submit = submit_options(executor, slurm, jobs)
    if plan:
        wanted = [w for w in (only or "").split(",") if w]
        cells = [c for c in plan_cells(cfg) if not wanted or any(w in c.id for w in wanted)]
        for c in cells:
            try:
                state = "done" if is_done(cfg, c, Path(out)) else "todo"
            except ConfigError:
                state = "stale"  # finished under another config: --redo retrains it
            print(f"{state:5s} {c.id}")
        print(f"{len(cells)} cells")
        return 0
    rc = 0
    if not report_only:
        meta = run_bench(cfg, out, quiet=quiet, redo=redo, only=only, command=command, jobs=jobs, submit=submit)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # under torchrun, rank 0 reports
        failed, not_run = meta.get("cells_failed") or [], meta.get("cells_not_run") or []
        print(f"\nbench {cfg.name}: {meta['cells_run']} cell(s) run, {meta['cells_skipped']} reused"
              + (f", {len(failed)} failed, {len(not_run)} not run" if failed or not_run else "")
              + f", wall time {meta['wall_s']:.0f} s")
        for f in failed:
            print(f"  FAILED {f['cell']} (job {f['job_id']}): {f['error']}\n    log: {f['log']}", file=sys.stderr)
        for f in not_run:
            print(f"  not run {f['cell']}: {f['error'].removeprefix('not run: ')}", file=sys.stderr)
        rc = 1 if failed or not_run else 0
    else:
        write_report(out)
    print()
    print(terminal_tables(out))
    print(f"wrote {out}/results.csv, {out}/report.md, {out}/report.html")
    return rc
