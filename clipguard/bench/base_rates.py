"""Base rates for columns added after the clean-data model was trained.

A clean-data cell measures every poisoned column of the grid as it was when the cell ran: its
"ASR" there is the base rate each defence is read against. A column added to the config later
(a new dose, a new attack) would have no base rate, and retraining the clean model to get one
wastes a full training run. Its saved final model measures the new columns instead: the same
weights, probe and seed as at the end of its run, so the figures are what the run would have
written. A column whose poisoned set changed since (same label, other options) is measured again.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from clipguard.bench.cache import BenchCache
from clipguard.bench.cell import attack_columns, read_cell, reference_asr
from clipguard.bench.config import AttackSpec, BenchConfig
from clipguard.bench.plan import Cell
from clipguard.errors import ClipguardError
from clipguard.io import write_json


def stale_columns(cfg: BenchConfig, cell: Cell, cache: BenchCache, record: dict[str, Any]) -> list[AttackSpec]:
    """The grid's poisoned attacks whose columns the clean cell's record lacks, or measured on
    another poisoned set than the grid's (the manifests differ)."""
    have = {a.get("column"): str(Path(str(a.get("manifest"))).resolve()) for a in record.get("asr", [])}
    out = []
    for a in cfg.attacks:
        if a.clean:
            continue
        cols = attack_columns(a, cfg.attacks)
        if any(c not in have for c in cols):
            out.append(a)
            continue
        manifests = [str(Path(m).resolve()) for m in cache.poisoned(cell.dataset, a, cell.seed).manifests]
        if [have[c] for c in cols] != manifests:
            out.append(a)
    return out


def top_up_base_rates(cfg: BenchConfig, out: Path, cache: BenchCache, cells: list[Cell]) -> dict[str, list[str]]:
    """Measure the missing or stale columns of every finished clean-data cell in ``cells`` from its
    final checkpoint and write them into its JSON (atomically). Returns ``{"added": cell ids,
    "skipped": "cell id: why"}``; a cell that cannot be measured is skipped with a warning, never
    left half-written."""
    import torch

    from clipguard.evaluation.linear_probe import fit_probe
    from clipguard.models import checkpoint as ckpt
    from clipguard.models.device import resolve_device
    from clipguard.models.factory import create_model
    from clipguard.training.trainer import epochs_done

    added: list[str] = []
    skipped: list[str] = []
    for cell in cells:
        if not cell.attack.clean or cell.stage == "scan":
            continue
        record = read_cell(cell.json_path(out))
        if record is None:
            continue
        try:
            attacks = stale_columns(cfg, cell, cache, record)
            if not attacks:
                continue
            latest = ckpt.resolve_latest(cell.run_dir(out) / "checkpoints")
            final = len(record.get("epochs", []))
            if latest is None or epochs_done(ckpt.read_state(latest)) != final:
                raise ClipguardError(f"no checkpoint of its final epoch ({final}) in {cell.run_dir(out)}")
            device = resolve_device(cfg.device)
            model = create_model(cfg.model, checkpoint=latest, device=device).eval()
            probe_data = cache.probe_data(cell.dataset)
            with torch.no_grad():
                probe = fit_probe(model, probe_data, device, cell.seed) if probe_data is not None else None
                fresh = reference_asr(cfg, cell, cache, model, device, probe, attacks=attacks)
        except ClipguardError as e:
            skipped.append(f"{cell.id}: {e}")
            warnings.warn(f"base rates of {cell.id} not measured: {e}", stacklevel=2)
            continue
        new_cols = {a["column"] for a in fresh}
        record["asr"] = [a for a in record.get("asr", []) if a.get("column") not in new_cols] + fresh
        record["base_rates_added"] = sorted(set(record.get("base_rates_added", [])) | new_cols)
        write_json(cell.json_path(out), record)
        added.append(cell.id)
    return {"added": added, "skipped": skipped}
