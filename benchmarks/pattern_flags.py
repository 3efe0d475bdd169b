"""How precise SafeCLIP's pattern veto is at several cuts, at a finished bench cell's last split.

The veto flags a pair when its image's pattern z-score (defenses/pattern_veto.py) is above
``pattern_z``; ``pattern_unlearn_z`` unlearns only the pairs above a second cut. This script
re-scores every pair of a finished SafeCLIP cell with its last checkpoint (the model, and the
pair scores its last split ranked by) and prints, for each cut, how many pairs pass it, how many
of them are clean, and how many of each attack part's pairs. Diagnostics only: it reads the
attack manifest, which no training choice may do.

    .venv/bin/python benchmarks/pattern_flags.py configs/safeclip-select.yaml runs/r38-val10 \
        fmnist/four-rotated/aug4-crop50-pat3-z125-riskyneg/seed31
    .venv/bin/python benchmarks/pattern_flags.py ... --cuts 1 2 3 --tail 3   # the ceiling's tail only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from clipguard.bench.cache import BenchCache
from clipguard.bench.config import load_config
from clipguard.bench.plan import plan_cells
from clipguard.defenses.pair_scores import outlier_tail
from clipguard.defenses.pattern_veto import PatternVeto
from clipguard.errors import ConfigError
from clipguard.evaluation.detection import per_part
from clipguard.models import checkpoint as ckpt
from clipguard.models.factory import create_model, get_tokenizer
from clipguard.training.distributed import DistInfo


def flag_counts(config: str | Path, out: str | Path, cell_id: str,
                cuts: tuple[float, ...] = (3, 4, 5, 6, 8), tail: float | None = None,
                sets: tuple[str, ...] = ()) -> list[dict]:
    """One row per cut: pairs above it, the clean ones among them, and each attack part's. With
    ``tail`` (the outlier rule's z), only the pairs of the last split's low tail, which the ceiling
    keeps out, are counted, and a first row (cut None) counts the tail itself. ``sets``: the
    bench's ``--set`` overrides the cell ran with."""
    seed = int(cell_id.rsplit("seed", 1)[1])
    cfg = load_config(config, [*sets, f"seeds=[{seed}]"])
    cells = [c for c in plan_cells(cfg) if c.id == cell_id]
    if not cells:
        raise ConfigError(f"{config}: no cell {cell_id}")
    cell, out = cells[0], Path(out)
    params = cell.run_dir(out) / "params.json"
    if not params.is_file():
        raise ConfigError(f"{cell_id}: no finished run under {cell.run_dir(out)}")
    params = json.loads(params.read_text())
    opts = params.get("strategy") or {}  # every option the run resolved
    if params.get("defense") != "safeclip" or opts.get("pattern_z") is None:
        raise ConfigError(f"{cell_id}: not a SafeCLIP cell with the pattern veto (pattern_z)")
    folder = ckpt.resolve_latest(cell.run_dir(out) / "checkpoints")
    if folder is None:
        raise ConfigError(f"{cell_id}: no checkpoint under {cell.run_dir(out)}")
    data, poison = BenchCache(cfg, out).train_data(cell.dataset, cell.attack, cell.seed)
    model = create_model(cfg.model, seed=0)
    ckpt.load_weights(model, folder)
    model.eval()
    sims = load_file(str(folder / "strategy.safetensors"))["sims"]
    ctx = SimpleNamespace(data=data, tokens=get_tokenizer(cfg.model)(data.captions), raw_model=model,
                          device=torch.device("cpu"), dist=DistInfo())
    veto = PatternVeto(float(opts["pattern_z"]), float(opts["pattern_share"]), int(opts["pattern_clusters"]),
                       int(opts["gmm_seed"]), group_pairs=opts.get("pattern_group_pairs"))
    poisoned = poison.mask.bool()
    parts = {p.attack: m for p, m in zip(cell.attack.parts, poison.masks)}
    rows, masks = list(cuts), veto.flags(ctx, -sims, cuts)
    if tail is not None:  # the tail itself first, then each cut within it
        where = outlier_tail(sims, tail)
        rows, masks = [None, *rows], [where, *(f & where for f in masks)]
    return [{"cut": cut, "flagged": int(f.sum()), "clean": int((f & ~poisoned).sum()), **per_part(f, parts)}
            for cut, f in zip(rows, masks)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("cell")
    ap.add_argument("--cuts", type=float, nargs="+", default=[3, 4, 5, 6, 8])
    ap.add_argument("--tail", type=float, default=None,
                    help="count only the outlier rule's tail at this z (the pairs its ceiling keeps out)")
    ap.add_argument("--set", action="append", default=[], dest="sets",
                    help="an override the bench ran the cell with (as clipguard bench --set)")
    a = ap.parse_args(argv)
    for r in flag_counts(a.config, a.out, a.cell, tuple(a.cuts), a.tail, tuple(a.sets)):
        parts = " ".join(f"{k} {v}" for k, v in r.items() if k not in ("cut", "flagged", "clean"))
        head = f"tail (z {a.tail:g})" if r["cut"] is None else f"z > {r['cut']:g}"
        print(f"{head}: {r['flagged']} pairs, {r['clean']} clean | {parts}")


if __name__ == "__main__":
    main()
