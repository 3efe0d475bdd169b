"""Cells of the grid and where their files live; the order guarantees that a cell's base model (a
cell of the same dataset, attack and seed) is made before it: a fine-tuning cell's starting point,
a detect-then-train cell's or a scan-only cell's scoring model (a pre-training model, or one a
fine-tuning defence cleaned)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipguard.bench.config import AttackSpec, BenchConfig, DatasetSpec, DefenseSpec, detect_depth, model_runs


@dataclass(frozen=True)
class Cell:
    dataset: DatasetSpec
    attack: AttackSpec
    defense: DefenseSpec
    seed: int
    stage: str  # "pretrain" | "finetune" | "scan"
    base: str | None = None  # fine-tuning / scan: label of the pre-training defence it starts from / scans with

    @property
    def method(self) -> str:
        """Row label in the tables: the defence, 'base+finetune-defence', or 'base+scan'."""
        return self.defense.label if self.stage == "pretrain" else f"{self.base}+{self.defense.label}"

    @property
    def id(self) -> str:
        return f"{self.dataset.label}/{self.attack.label}/{self.method}/seed{self.seed}"

    @property
    def filename(self) -> str:
        return self.id.replace("/", "__") + ".json"

    def run_dir(self, out: Path) -> Path:
        name = f"scan-{self.base}" if self.stage == "scan" else f"{self.stage}-{self.defense.label}"
        return Path(out) / "runs" / self.dataset.label / self.attack.label / f"seed{self.seed}" / name

    def json_path(self, out: Path) -> Path:
        return Path(out) / "cells" / self.filename


# the entry of every scan-only cell (its method is 'base+scan')
SCAN_ENTRY = DefenseSpec(label="scan", defense="scan")


def plan_cells(cfg: BenchConfig) -> list[Cell]:
    cells: list[Cell] = []
    for ds in cfg.datasets:
        for attack in cfg.attacks:
            for seed in cfg.seeds:
                if not attack.runs_seed(seed):
                    continue
                group: list[Cell] = []
                for d in cfg.pretrain.defenses:
                    if attack.runs(d.label):
                        group.append(Cell(ds, attack, d, seed, "pretrain"))
                # scan-only: detection metrics need poisons; the base must run on this attack
                if cfg.scan is not None and not attack.clean:
                    for b in cfg.scan.bases:
                        if model_runs(attack, b, cfg.finetune):
                            group.append(Cell(ds, attack, SCAN_ENTRY, seed, "scan", base=b))
                # a model trained on clean data has no backdoor for a fine-tuning defence to remove
                if cfg.finetune is not None and not attack.clean and attack.runs(cfg.finetune.base):
                    for d in cfg.finetune.defenses:
                        group.append(Cell(ds, attack, d, seed, "finetune", base=cfg.finetune.base))
                # every base before the cells that need it (stable: plan order among equals)
                cells.extend(sorted(group, key=lambda c: _depth(cfg, c)))
    return cells


def _depth(cfg: BenchConfig, cell: Cell) -> int:
    """How many models must be made before the cell's own."""
    if cell.stage == "pretrain":
        return detect_depth(cfg.pretrain.defenses, cell.defense.label, cfg.source, cfg.finetune)
    ref = reference_cell(cfg, cell)
    labels = [cell.base, *([ref.method] if ref is not None else [])]
    return 1 + max(detect_depth(cfg.pretrain.defenses, b, cfg.source, cfg.finetune) for b in labels)


def model_cell(cfg: BenchConfig, cell: Cell, label: str) -> Cell:
    """The cell that makes the model ``label`` for ``cell``'s dataset, attack and seed: a
    pre-training entry, or a fine-tuning row 'BASE+ENTRY'."""
    if cfg.finetune is not None:
        for d in cfg.finetune.defenses:
            if label == f"{cfg.finetune.base}+{d.label}":
                return Cell(cell.dataset, cell.attack, d, cell.seed, "finetune", base=cfg.finetune.base)
    base = next(d for d in cfg.pretrain.defenses if d.label == label)
    return Cell(cell.dataset, cell.attack, base, cell.seed, "pretrain")


def base_cell(cfg: BenchConfig, cell: Cell) -> Cell:
    """The cell whose final model a fine-tuning cell starts from (a pre-training cell) or a
    scan-only cell scores the data with."""
    return model_cell(cfg, cell, cell.base)


def detect_base_cell(cfg: BenchConfig, cell: Cell) -> Cell:
    """The cell whose final model a detect-then-train cell scores its data with (the first, when
    several models score it)."""
    return model_cell(cfg, cell, cell.defense.detect.base)


def detect_base_cells(cfg: BenchConfig, cell: Cell) -> list[Cell]:
    """Every cell whose final model scores a detect-then-train cell's data."""
    spec = cell.defense.detect
    return [model_cell(cfg, cell, b) for b in [spec.base, *spec.more_bases]]


def reference_cell(cfg: BenchConfig, cell: Cell) -> Cell | None:
    """The cell whose final model the reference-comparing detectors (``shift``) of a detect-then-
    train or scan-only cell read; None when there are none (or for a scan of the reference itself)."""
    if cell.stage == "scan":
        ref = cfg.scan.reference if cfg.scan is not None else None
        if ref is None or ref == cell.base:
            return None
    elif cell.stage == "pretrain" and cell.defense.detect is not None:
        ref = cell.defense.detect.reference
        if ref is None:
            return None
    else:
        return None
    return model_cell(cfg, cell, ref)


def dependencies(cfg: BenchConfig, cell: Cell) -> list[Cell]:
    """The cells that must be finished before ``cell`` can run."""
    ref = reference_cell(cfg, cell)
    extra = [ref] if ref is not None else []
    if cell.stage in ("finetune", "scan"):
        return [base_cell(cfg, cell), *extra]
    if cell.defense.detect is not None:
        within = within_cell(cfg, cell)
        return [*detect_base_cells(cfg, cell), *extra, *([within] if within is not None else [])]
    return []


def within_cell(cfg: BenchConfig, cell: Cell) -> Cell | None:
    """The detect-then-train cell whose dropped pairs a detect-then-train cell drops too (``within``)."""
    spec = cell.defense.detect if cell.stage == "pretrain" else None
    if spec is None or spec.within is None:
        return None
    return model_cell(cfg, cell, spec.within)


def dependency(cfg: BenchConfig, cell: Cell) -> Cell | None:
    """The first cell that must be finished before ``cell`` can run, if any."""
    deps = dependencies(cfg, cell)
    return deps[0] if deps else None
