"""``clipguard demo [--quick]`` (what ``make demo`` runs): the demo grid on Fashion-MNIST."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from clipguard.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run configs/demo.yaml (attacks x defences on Fashion-MNIST) and print the tables")
    p.add_argument("--quick", action="store_true", help="configs/demo-quick.yaml: one seed, small, <= 3 min")
    p.add_argument("--config", default=None, help="another grid YAML (default: configs/demo.yaml)")
    p.add_argument("--out", default=None, help="bench folder (default: runs/demo or runs/demo-quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set seeds=[0,1,2]")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells run at once in worker processes (default: the number of cores, at most 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard.commands.bench import run_grid

    name = "demo-quick" if args.quick else "demo"
    config = Path(args.config) if args.config else CONFIG_DIR / f"{name}.yaml"
    if not config.is_file():
        raise ConfigError(f"demo config not found: {config} (run from a source checkout, or pass --config)")
    out = args.out or f"runs/{name}"
    t0 = time.perf_counter()
    cmd = "clipguard demo" + (" --quick" if args.quick else "") + (f" --out {out}" if args.out else "")
    jobs = args.jobs or min(2, os.cpu_count() or 1)
    rc = run_grid(str(config), out, overrides=args.overrides, quiet=args.quiet, command=cmd, jobs=jobs)
    print(f"{cmd}: total wall time {time.perf_counter() - t0:.0f} s (config {config}, results in {out}/)")
    return rc
