"""Benchmark grids: datasets x attacks x defences (pre-training, fine-tuning) x seeds, resumable."""

from clipguard.bench.config import BenchConfig, load_config, parse_config, validate_names
from clipguard.bench.plan import Cell, plan_cells
from clipguard.bench.runner import run_bench

__all__ = ["BenchConfig", "Cell", "load_config", "parse_config", "plan_cells", "run_bench", "validate_names"]
