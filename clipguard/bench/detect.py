"""Detection in a grid: detect-then-train cells and scan-only cells.

Both encode the poisoned training set of one (dataset, attack, seed) with the final model of a
base pre-training cell and score every pair with ``clipguard.detection`` (the code of
``clipguard scan``). A detect-then-train cell then trains its defence on the pairs the detector
keeps; a scan-only cell runs several detectors and records their metrics, and trains nothing.

The poison masks the bench builds for its diagnostics give the detection metrics (AUROC, AUPRC,
TPR@1%FPR, precision@k, overall and per ASR column) and the count of poisons kept; they never
reach a score or a keep decision.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipguard.bench.cache import BenchCache, PoisonedSet
from clipguard.bench.config import BenchConfig, DetectSpec, ScanSpec
from clipguard.bench.plan import Cell, reference_cell, within_cell
from clipguard.errors import ConfigError
from clipguard.io import write_json

DETECT_FORMAT = 1
DETECTION_FILE = "detection.json"  # in the cell's run folder: the record, and the dropped rows
SCORES_FILE = "scores.csv"         # in the cell's run folder: every pair's score and rank per detector


# ---------------------------------------------------------------------------- config
def resolved_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Every option of the detector with the defaults filled in (the cache key: writing a default
    out keeps a finished cell), less those at their neutral value (an option added later keeps
    the cells made before it)."""
    from clipguard.detection.base import build

    return build(name, dict(options or {})).opt.identity()


def detect_conf(spec: DetectSpec) -> dict[str, Any]:
    """What decides a detect-then-train cell's kept pairs, besides its base model."""
    conf = {"format": DETECT_FORMAT, "detector": spec.detector,
            "options": resolved_options(spec.detector, spec.options), "keep_fraction": spec.keep_fraction}
    if spec.veto:  # only when given: entries without one keep their finished cells
        conf["veto"] = {n: resolved_options(n, o) for n, o in spec.veto.items()}
    if spec.combine != "mean":
        conf["combine"] = spec.combine
    if spec.relabel is not None:
        conf["relabel"] = spec.relabel
    return conf


def scan_detectors(scan: ScanSpec, reference: bool) -> list[str]:
    """The detectors a scan-only cell runs: all of the grid's, less those that compare with a
    reference model in a cell that has none (the scan of the reference model itself)."""
    from clipguard.detection.base import needs_reference

    return [n for n in scan.detectors if reference or not needs_reference(n, scan.options.get(n))]


def scan_conf(scan: ScanSpec, reference: bool = False) -> dict[str, Any]:
    return {"format": DETECT_FORMAT,
            "detectors": [{"name": n, "options": resolved_options(n, scan.options.get(n))}
                          for n in scan_detectors(scan, reference)]}


def detector_label(name: str, options: dict[str, Any]) -> str:
    """The detector and the options it was given that differ from its defaults: 'dao',
    'dao (k=32)'. The detection table's row label."""
    from clipguard.detection.base import build

    default = build(name).opt.to_dict()
    diff = [f"{k}={v}" for k, v in options.items() if default.get(k) != v]
    return name + (f" ({', '.join(diff)})" if diff else "")


# ---------------------------------------------------------------------------- running
def base_checkpoint(base: Cell, cell: Cell, out: Path) -> Path:
    from clipguard.models import checkpoint as ckpt

    if not base.json_path(out).is_file():
        raise ConfigError(f"{cell.id}: base model {base.id} is not finished")
    latest = ckpt.resolve_latest(base.run_dir(out) / "checkpoints")
    if latest is None:
        raise ConfigError(f"{cell.id}: base run {base.run_dir(out)} has no checkpoint")
    return latest


def column_masks(cfg: BenchConfig, cell: Cell, poison: PoisonedSet) -> dict[str, np.ndarray]:
    """One poison mask per ASR column of the cell's attack (one per attack part)."""
    from clipguard.bench.cell import attack_columns

    return {col: m.numpy().astype(bool) for col, m in zip(attack_columns(cell.attack, cfg.attacks), poison.masks)}


def run_detection(cfg: BenchConfig, cell: Cell, base: Cell | Sequence[Cell], out: Path, cache: BenchCache, *,
                  detectors: Sequence[tuple[str, dict[str, Any]]], keep_fraction: float | None,
                  veto_detectors: Sequence[str] = (), fingerprint: str, base_fingerprint: str, keep_rows: bool,
                  relabel: int | None = None, quiet: bool = False, combine: str = "mean",
                  reference: Cell | None = None, within: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Encode the cell's training data with ``base``'s final model, score it with each detector,
    keep by the first detector's rule (or ``keep_fraction``) minus what each of
    ``veto_detectors`` (among ``detectors``) rejects, write ``scores.csv`` and
    ``detection.json`` into the cell's run folder, and return the record.

    ``base`` may be several cells: each model scores the pairs and the scores combine as the mean
    (``combine="max"``: the largest) of their rank shares (``clipguard.detection.runner.combine_results``).

    ``reference``: the cell whose final model encodes the pairs once more, as every scoring model's
    ``PairFeatures.reference`` (for ``shift``).

    ``within``: (label, detection record) of another detect-then-train entry: the rows it
    dropped are dropped here too.

    ``keep_rows``: record the dropped rows (a detect-then-train cell trains on the rest).
    ``relabel``: also record, per dropped row, the kept row whose caption it borrows
    (``clipguard.detection.relabel``, from the same embeddings)."""
    from clipguard.detection import outputs
    from clipguard.detection.base import build
    from clipguard.detection.runner import encode_pairs, needs_pixels, needs_residuals, scan_models
    from clipguard.detection.search import NeighbourSearch
    from clipguard.evaluation.runner import load_model
    from clipguard.models.device import resolve_device
    from clipguard.models.factory import get_tokenizer

    out = Path(out)
    run_dir = cell.run_dir(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    data, poison = cache.train_data(cell.dataset, cell.attack, cell.seed)
    bases = [base] if isinstance(base, Cell) else list(base)
    checkpoints = [base_checkpoint(b, cell, out) for b in bases]
    dets = [build(name, opts) for name, opts in detectors]
    dev = resolve_device(cfg.device)
    mask = poison.mask.numpy().astype(bool) if poison.mask is not None else None
    parts = column_masks(cfg, cell, poison) if mask is not None else {}
    encode_s = 0.0
    first_features = None
    search = NeighbourSearch.from_dict(cfg.neighbour_search)  # the grid's (exact when it gives none)

    def encode(checkpoint: Path, pixels: bool, residuals: bool = False):
        """One model's features of the cell's pairs, its loading and encoding counted in ``encode_s``."""
        nonlocal encode_s
        t0 = time.perf_counter()
        net, model_name = load_model(checkpoint, cfg.model, str(dev))
        features = encode_pairs(net, get_tokenizer(model_name), data, device=dev, progress=not quiet, pixels=pixels,
                                residuals=residuals, search=search)
        encode_s += time.perf_counter() - t0
        return features

    t1 = time.perf_counter()
    ref_features = encode(base_checkpoint(reference, cell, out), pixels=False) if reference is not None else None

    def encoded():
        nonlocal first_features
        for checkpoint in checkpoints:
            features = encode(checkpoint, pixels=needs_pixels(dets), residuals=needs_residuals(dets))
            features.reference = ref_features
            if first_features is None:  # relabel borrows captions by the first model's neighbours
                first_features = features
            yield features

    result, _ = scan_models(encoded(), dets, keep_detector=dets[0].name, keep_fraction=keep_fraction,
                            veto_detectors=veto_detectors, poisoned=mask, parts=parts or None, progress=not quiet,
                            combine=combine)
    detect_s = time.perf_counter() - t1 - encode_s
    if within is not None:  # before anything is written: scores.csv's kept column is what trains
        from clipguard.detection.base import within_keep

        earlier = np.zeros(len(data), dtype=bool)
        earlier[kept_indices(within[1], len(data))] = True
        result.keep = within_keep(result.keep, earlier, within[0])
    features = first_features
    outputs.write_scores(run_dir / SCORES_FILE, data, result, outputs.row_ids(data, "csv"))

    n = len(data)
    summaries: dict[str, Any] = {}
    for r in result.runs:
        s = r.summary(n, mask)
        s["label"] = detector_label(r.name, s["options"])
        if parts:
            s["keep"]["poisons_kept_parts"] = {col: int((r.keep.mask & m).sum()) for col, m in parts.items()}
        summaries[r.name] = s
    rec: dict[str, Any] = {
        "format": DETECT_FORMAT, "fingerprint": fingerprint, "base": " & ".join(b.method for b in bases),
        "base_cell": bases[0].id, "base_fingerprint": base_fingerprint,
        "checkpoint": str(checkpoints[0].relative_to(out)),
        "n_pairs": n, "n_poisoned": int(mask.sum()) if mask is not None else None,
        "columns": {col: int(m.sum()) for col, m in parts.items()},
        "encode_s": round(encode_s, 3), "detect_s": round(detect_s, 3), "detectors": summaries,
    }
    if reference is not None:
        rec["reference"] = reference.method
    if cfg.neighbour_search:  # what each search was: its cells and measured recall
        rec["neighbour_search"] = {**cfg.neighbour_search, "searches": first_features.searches()}
    if len(bases) > 1:
        rec["bases"] = [b.method for b in bases]
        rec["checkpoints"] = [str(c.relative_to(out)) for c in checkpoints]
    if keep_rows:
        keep = result.keep.mask
        k = int(keep.sum())
        rec["keep"] = {"detector": result.keep_detector, **result.keep.rule, "kept": k, "dropped": n - k,
                       "kept_fraction": k / n if n else None}
        if mask is not None:
            rec["keep"]["poisons"] = int(mask.sum())
            rec["keep"]["poisons_kept"] = int((keep & mask).sum())
            rec["keep"]["parts"] = {col: {"poisons": int(m.sum()), "kept": int((keep & m).sum())}
                                    for col, m in parts.items()}
        rec["dropped_rows"] = np.flatnonzero(~keep).tolist()
        if relabel is not None:
            from clipguard.detection.relabel import borrowed_captions

            borrowed = borrowed_captions(features.image, features.text, keep, relabel, device=dev)
            rec["borrowed_rows"] = borrowed.tolist()
            rec["keep"]["relabelled"] = len(borrowed)
            if mask is not None:
                # a relabelled poison whose borrowed caption is itself a kept poison's
                rec["keep"]["borrowed_from_poisons"] = int(mask[borrowed].sum())
                rec["keep"]["parts_borrowed_from_poisons"] = {col: int(m[borrowed].sum()) for col, m in parts.items()}
    write_json(run_dir / DETECTION_FILE, rec)
    return rec


def read_detection(cell: Cell, out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The cell's detection.json when it was made with this config, else None."""
    from clipguard.bench.cell import read_cell

    rec = read_cell(cell.run_dir(out) / DETECTION_FILE)
    return rec if rec is not None and rec.get("fingerprint") == fingerprint else None


def detection_for(cfg: BenchConfig, cell: Cell, base: Cell | Sequence[Cell], out: Path, cache: BenchCache, *,
                  fingerprint: str, base_fingerprint: str, quiet: bool = False) -> dict[str, Any]:
    """A detect-then-train cell's detection: read from its run folder when made with this config
    (a resumed cell trains on exactly the pairs it started with), else made now."""
    spec = cell.defense.detect

    def make() -> dict[str, Any]:
        rec = read_detection(cell, out, fingerprint)
        if rec is not None:
            return rec
        return run_detection(cfg, cell, base, out, cache,
                             detectors=[(spec.detector, spec.options), *spec.veto.items()],
                             keep_fraction=spec.keep_fraction, veto_detectors=list(spec.veto), fingerprint=fingerprint,
                             base_fingerprint=base_fingerprint, keep_rows=True, relabel=spec.relabel, quiet=quiet,
                             combine=spec.combine, reference=reference_cell(cfg, cell), within=within_dropped())

    def within_dropped() -> tuple[str, dict[str, Any]] | None:
        """The ``within`` entry's finished detection record (the rows it dropped)."""
        other = within_cell(cfg, cell)
        if other is None:
            return None
        from clipguard.bench.cell import read_cell

        rec = read_cell(other.run_dir(out) / DETECTION_FILE)
        if rec is None or "dropped_rows" not in rec:
            raise ConfigError(f"{cell.id}: detect.within {other.method!r} has no finished detection in "
                              f"{other.run_dir(out)}; run that entry first")
        return other.method, rec

    def read() -> dict[str, Any]:
        rec = read_detection(cell, out, fingerprint)
        if rec is None:
            raise RuntimeError(f"{cell.id}: rank 0 wrote no {DETECTION_FILE}")
        return rec

    from clipguard.training.distributed import rank_zero_first

    return rank_zero_first(make, read)


def kept_indices(rec: dict[str, Any], n: int) -> np.ndarray:
    if rec.get("n_pairs") != n:
        raise ConfigError(f"{DETECTION_FILE} describes {rec.get('n_pairs')} pairs, the training data has {n}; "
                          f"use --redo")
    keep = np.ones(n, dtype=bool)
    keep[np.asarray(rec.get("dropped_rows", []), dtype=np.int64)] = False
    return np.flatnonzero(keep)


def training_rows(rec: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows a detect-then-train cell trains on and, for each, the row whose caption it takes:
    the kept rows with their own captions, then (with ``relabel``) every dropped row with the
    caption it borrows."""
    kept = kept_indices(rec, n)
    borrowed = rec.get("borrowed_rows")
    if borrowed is None:
        return kept, kept
    dropped = np.asarray(rec.get("dropped_rows", []), dtype=np.int64)
    borrowed = np.asarray(borrowed, dtype=np.int64)
    if borrowed.shape != dropped.shape:
        raise ConfigError(f"{DETECTION_FILE}: {len(borrowed)} borrowed captions for {len(dropped)} dropped rows; use --redo")
    return np.concatenate([kept, dropped]), np.concatenate([kept, borrowed])


def public(rec: dict[str, Any]) -> dict[str, Any]:
    """The record for the cell JSON: everything but the row lists (in detection.json)."""
    return {k: v for k, v in rec.items() if k not in ("dropped_rows", "borrowed_rows", "fingerprint")}
