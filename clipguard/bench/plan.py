"""Cells of the grid and where their files live; the order guarantees a fine-tuning cell's base
model (a pre-training cell of the same dataset, attack and seed) is trained before it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipguard.bench.config import AttackSpec, BenchConfig, DatasetSpec, DefenseSpec


@dataclass(frozen=True)
class Cell:
    dataset: DatasetSpec
    attack: AttackSpec
    defense: DefenseSpec
    seed: int
    stage: str  # "pretrain" | "finetune"
    base: str | None = None  # fine-tuning: label of the pre-training defence it starts from

    @property
    def method(self) -> str:
        """Row label in the tables: the defence, or 'base+finetune-defence'."""
        return self.defense.label if self.stage == "pretrain" else f"{self.base}+{self.defense.label}"

    @property
    def id(self) -> str:
        return f"{self.dataset.label}/{self.attack.label}/{self.method}/seed{self.seed}"

    @property
    def filename(self) -> str:
        return self.id.replace("/", "__") + ".json"

    def run_dir(self, out: Path) -> Path:
        return Path(out) / "runs" / self.dataset.label / self.attack.label / f"seed{self.seed}" / \
            f"{self.stage}-{self.defense.label}"

    def json_path(self, out: Path) -> Path:
        return Path(out) / "cells" / self.filename


def plan_cells(cfg: BenchConfig) -> list[Cell]:
    cells: list[Cell] = []
    for ds in cfg.datasets:
        for attack in cfg.attacks:
            for seed in cfg.seeds:
                if not attack.runs_seed(seed):
                    continue
                for d in cfg.pretrain.defenses:
                    if attack.runs(d.label):
                        cells.append(Cell(ds, attack, d, seed, "pretrain"))
                # a model trained on clean data has no backdoor for a fine-tuning defence to remove
                if cfg.finetune is not None and not attack.clean and attack.runs(cfg.finetune.base):
                    for d in cfg.finetune.defenses:
                        cells.append(Cell(ds, attack, d, seed, "finetune", base=cfg.finetune.base))
    return cells


def base_cell(cfg: BenchConfig, cell: Cell) -> Cell:
    """The pre-training cell whose final model a fine-tuning cell starts from."""
    base = next(d for d in cfg.pretrain.defenses if d.label == cell.base)
    return Cell(cell.dataset, cell.attack, base, cell.seed, "pretrain")
