"""``clipguard bench CONFIG.yaml --out DIR``: run (or resume) a benchmark grid and report it."""

from __future__ import annotations

import argparse


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
                   help="cells run at once in worker processes, each with cores/JOBS threads (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_grid(args.config, args.out, overrides=args.overrides, only=args.only, redo=args.redo,
                    report_only=args.report_only, plan=args.plan, quiet=args.quiet, jobs=args.jobs)


def run_grid(config: str, out: str, *, overrides: list[str] | None = None, only: str | None = None,
             redo: bool = False, report_only: bool = False, plan: bool = False, quiet: bool = False,
             command: str | None = None, jobs: int = 1) -> int:
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
    if not report_only:
        meta = run_bench(cfg, out, quiet=quiet, redo=redo, only=only, command=command, jobs=jobs)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # under torchrun, rank 0 reports
        print(f"\nbench {cfg.name}: {meta['cells_run']} cell(s) run, {meta['cells_skipped']} reused, "
              f"wall time {meta['wall_s']:.0f} s")
    else:
        write_report(out)
    print()
    print(terminal_tables(out))
    print(f"wrote {out}/results.csv, {out}/report.md, {out}/report.html")
    return 0
