"""Base rates for columns added after the clean-data model was trained.

A clean-data cell measures every poisoned column of the grid as it was when the cell ran: its
"ASR" there is the base rate each defence is read against. A column added to the config later
(a new dose, a new attack) would have no base rate, and retraining the clean model to get one
wastes a full training run. Its saved final model measures the new columns instead: the same
weights, probe and seed as at the end of its run, so the figures are what the run would have
written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipguard.bench.cache import BenchCache
from clipguard.bench.cell import attack_columns, read_cell, reference_asr
from clipguard.bench.config import AttackSpec, BenchConfig
from clipguard.bench.plan import Cell
from clipguard.io import write_json


def missing_columns(cfg: BenchConfig, record: dict[str, Any]) -> list[AttackSpec]:
    """The grid's poisoned attacks with a column the clean cell's record does not measure."""
    have = {a.get("column") for a in record.get("asr", [])}
    return [a for a in cfg.attacks if not a.clean and any(c not in have for c in attack_columns(a))]


def top_up_base_rates(cfg: BenchConfig, out: Path, cache: BenchCache, cells: list[Cell]) -> list[str]:
    """Measure the missing columns of every finished clean-data cell in ``cells`` from its final
    checkpoint and add them to its JSON (atomically). Returns the ids of the cells topped up."""
    import torch

    from clipguard.evaluation.linear_probe import fit_probe
    from clipguard.models import checkpoint as ckpt
    from clipguard.models.device import resolve_device
    from clipguard.models.factory import create_model

    done = []
    for cell in cells:
        if not cell.attack.clean or cell.stage == "scan":
            continue
        record = read_cell(cell.json_path(out))
        if record is None:
            continue
        attacks = missing_columns(cfg, record)
        latest = ckpt.resolve_latest(cell.run_dir(out) / "checkpoints") if attacks else None
        if latest is None:
            continue
        device = resolve_device(cfg.device)
        model = create_model(cfg.model, checkpoint=latest, device=device).eval()
        probe_data = cache.probe_data(cell.dataset)
        with torch.no_grad():
            probe = fit_probe(model, probe_data, device, cell.seed) if probe_data is not None else None
            added = reference_asr(cfg, cell, cache, model, device, probe, attacks=attacks)
        have = {a.get("column") for a in record.get("asr", [])}
        added = [a for a in added if a["column"] not in have]
        record["asr"] = record.get("asr", []) + added
        record["base_rates_added"] = sorted(set(record.get("base_rates_added", []))
                                            | {a["column"] for a in added})
        write_json(cell.json_path(out), record)
        done.append(cell.id)
    return done
