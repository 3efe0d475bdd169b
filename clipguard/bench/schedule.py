"""The order in which a grid's cells start, and when each may start.

A fine-tuning, detect-then-train or scan-only cell needs its base (a cell of the same dataset,
attack and seed) finished first. Both ways of running cells side by side use this queue:
the ``--jobs`` worker pool (clipguard/bench/runner.py) and submitted jobs (``--executor slurm`` or
``local``, clipguard/bench/submit.py)."""

from __future__ import annotations

from pathlib import Path

from clipguard.bench.cell import is_done
from clipguard.bench.config import BenchConfig
from clipguard.bench.plan import Cell, dependencies


def priority(cell: Cell, bases: set[str]) -> int:
    """Bases of other cells first (they unlock work; a fine-tuned model that scores data too),
    then defended pre-training (detect-then-train included), then the other pre-training cells;
    the short fine-tuning and scan-only cells fill the workers at the end."""
    if cell.id in bases:
        return 0
    if cell.stage in ("finetune", "scan"):
        return 3
    return 1 if cell.defense.defense != "none" or cell.defense.detect is not None else 2


class CellQueue:
    """The cells left to start, by priority (stable: plan order within a priority). A cell is
    ready when it has no base, when its base is not among the cells to run (finished before, or
    left out by ``--only``), or when its base has finished."""

    def __init__(self, cfg: BenchConfig, out: str | Path, cells: list[Cell]):
        self.cfg, self.out = cfg, Path(out)
        self._ids = {c.id for c in cells}
        self._deps = {c.id: dependencies(cfg, c) for c in cells}
        bases = {d.id for deps in self._deps.values() for d in deps}
        self.pending: list[Cell] = sorted(cells, key=lambda c: priority(c, bases))

    def __bool__(self) -> bool:
        return bool(self.pending)

    def base(self, cell: Cell) -> Cell | None:
        """The first cell that must be finished before ``cell`` starts, if any."""
        deps = self._deps[cell.id]
        return deps[0] if deps else None

    def ready(self, cell: Cell) -> bool:
        return all(d.id not in self._ids or is_done(self.cfg, d, self.out) for d in self._deps[cell.id])

    def take(self, limit: int | None = None) -> list[Cell]:
        """Remove the ready cells from the queue and return them, first to start first; at most
        ``limit`` of them (None: all)."""
        cells = [c for c in self.pending if self.ready(c)]
        if limit is not None:
            cells = cells[: max(0, limit)]
        for c in cells:
            self.pending.remove(c)
        return cells

    def remove(self, cell: Cell) -> None:
        self.pending.remove(cell)
