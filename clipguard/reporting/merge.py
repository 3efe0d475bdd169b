"""Per-cell JSON -> one flat ``results.csv`` (one row per cell): the table every report reads."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from clipguard.errors import DataError
from clipguard.evaluation.intervals import wilson_ci95
from clipguard.io import write_text

BASE_COLUMNS = ["cell", "dataset", "attack", "stage", "method", "defense", "base", "seed", "train_pairs",
                "zeroshot_top1", "zeroshot_top5", "linear_probe_top1", "linear_probe_top5", "linear_probe_C",
                "train_data", "split"]
METRIC_COLUMNS = ["zeroshot_top1", "zeroshot_top5", "linear_probe_top1", "linear_probe_top5", "linear_probe_C"]
TAIL_COLUMNS = ["final_safe_fraction", "final_safe_poison_recall", "first_split_epoch", "first_split_auroc",
                "first_split_safe_fraction", "train_epochs_s", "train_wall_s", "eval_s", "resumed_from_epoch"]
FIRST_SPLIT_PREFIX = "first_split_poisons."  # per ASR column: share of its poisons in the first safe set
# detection.csv: one row per (cell, detector, ASR column) of every detect-then-train and scan-only cell
DETECTION_COLUMNS = ["cell", "dataset", "attack", "column", "seed", "stage", "method", "base", "detector", "label",
                     "auroc", "auprc", "tpr@1%fpr", "precision@k", "n", "n_poison", "rule_kept", "rule_poisons_kept",
                     "base_fingerprint"]


def load_cells(out: str | Path) -> list[dict[str, Any]]:
    """Every finished cell under ``out/cells`` in file-name order; a corrupt file is an error."""
    folder = Path(out) / "cells"
    cells = []
    for p in sorted(folder.glob("*.json")):
        try:
            cells.append(json.loads(p.read_text()))
        except ValueError as e:
            raise DataError(f"not valid JSON: {e}", file=str(p)) from None
    return cells


def cell_row(cell: dict[str, Any]) -> dict[str, Any]:
    """The flat row of one cell: clean metrics, one ``asr.<column>`` per attack part, timings."""
    m = cell.get("metrics", {})
    row: dict[str, Any] = {k: cell.get(k) for k in BASE_COLUMNS[:9]}
    for k in METRIC_COLUMNS:
        row[k] = m.get(k)
    parts = ((cell.get("config") or {}).get("attack") or {}).get("parts")
    row["train_data"] = cell.get("train_data") or ("clean" if parts == [] else "poisoned")
    row["split"] = cell.get("split", "test")
    for part in cell.get("asr", []):
        col = part.get("column") or part.get("attack")
        h = part.get("headline") or {}
        row[f"asr.{col}"] = h.get("value")
        row[f"asr_metric.{col}"] = h.get("metric")
        row[f"asr_n.{col}"] = h.get("n")
        _ci_columns(row, "asr", col, h, h.get("n"))
        lp = part.get("linear_probe") or {}
        row[f"asr_lp.{col}"] = lp.get("value")
        _ci_columns(row, "asr_lp", col, lp, lp.get("n", h.get("n")))  # the same images as the zero-shot ASR
        row[f"asr_base.{col}"] = part.get("base_rate")
        row[f"asr_target.{col}"] = (part.get("target") or {}).get("name")
    _detect_columns(cell, row)
    last = next((r for r in reversed(cell.get("epochs", [])) if "safe_poison_recall" in r), {})
    row["final_safe_fraction"] = last.get("safe_fraction")
    row["final_safe_poison_recall"] = last.get("safe_poison_recall")
    _first_split_columns(cell, row)
    row["first_decision_loss_vs_chance"] = next(
        (r[k] for r in cell.get("epochs", []) for k in CHANCE_KEYS if r.get(k) is not None), None)
    t = cell.get("timings", {})
    for k in ("train_epochs_s", "train_wall_s", "eval_s", "resumed_from_epoch"):
        row[k] = t.get(k)
    return row


def _ci_columns(row: dict[str, Any], key: str, col: str, block: dict[str, Any], n: Any) -> None:
    """``<key>_hits.<col>`` (successes) and the 95% Wilson interval ``<key>_ci95_lo/_hi.<col>`` of
    one ASR@1 over ``n`` images. A cell written before they were recorded gets them from the rate
    and ``n`` (rates are stored to 6 decimals, exact for any realistic ``n``)."""
    hits, ci, value = block.get("hits"), block.get("ci95"), block.get("value")
    if hits is None and isinstance(value, (int, float)) and isinstance(n, int) and n > 0:
        k = round(value * n)
        hits = k if abs(value * n - k) < 0.01 else None
    if hits is None:
        return
    row[f"{key}_hits.{col}"] = hits
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2) and isinstance(n, int) and 0 <= hits <= n:
        ci = wilson_ci95(hits, n)
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        row[f"{key}_ci95_lo.{col}"], row[f"{key}_ci95_hi.{col}"] = ci


# the epoch records in which a defence says how near chance the model was at its first decision
# (defenses.alignment): SafeCLIP at its first split, RoCLIP at a pool epoch after a plain one
CHANCE_KEYS = ("clip_loss_vs_chance", "plain_loss_vs_chance")


def first_split(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The first epoch record with pair scores: a pair-selecting defence's first split, after its
    warm-up (SafeCLIP: the first mixed epoch), the split an attacker who knows the defence targets."""
    return next((r for r in cell.get("epochs", []) if "similarity_auroc" in r), None)


def _first_split_columns(cell: dict[str, Any], row: dict[str, Any]) -> None:
    """At the first split: the epoch, the pair score's AUROC as a poison detector, the safe set's
    share of the data and, per ASR column, the share of that column's poisons inside it."""
    first = first_split(cell)
    if first is None:
        return
    row["first_split_epoch"] = first.get("epoch")
    row["first_split_auroc"] = first.get("similarity_auroc")
    row["first_split_safe_fraction"] = first.get("safe_fraction")
    if not first.get("poison_total"):
        return  # clean data: no poisons to count
    parts = [p for p in cell.get("asr", []) if not p.get("reference")]
    per_part = first.get("safe_poison_in")  # "k/n" per "<part>-<attack>", when several parts share the data
    for p in parts:
        col = p.get("column") or p.get("attack")
        if per_part:
            k_n = next((v for k, v in per_part.items() if k.split("-", 1)[0] == str(p.get("part"))), None)
            k, n = (int(x) for x in k_n.split("/")) if k_n else (0, 0)
            row[FIRST_SPLIT_PREFIX + col] = k / n if n else None
        elif len(parts) == 1:
            row[FIRST_SPLIT_PREFIX + col] = first.get("safe_poison_recall")


def _detect_columns(cell: dict[str, Any], row: dict[str, Any]) -> None:
    """A detect-then-train cell's filter: the keep detector, pairs kept, and per ASR column the
    share of its poisons kept and the keep detector's AUROC and TPR@1%FPR."""
    det = cell.get("detection") or {}
    keep = det.get("keep")
    if not keep:
        return
    row["detect_detector"] = keep.get("detector")
    row["detect_kept"] = keep.get("kept")
    row["detect_kept_fraction"] = keep.get("kept_fraction")
    if keep.get("poisons"):
        row["detect_poisons_kept_fraction"] = keep["poisons_kept"] / keep["poisons"]
    for col, p in (keep.get("parts") or {}).items():
        row[f"detect_poisons_kept.{col}"] = p["kept"] / p["poisons"] if p.get("poisons") else None
    metrics = ((det.get("detectors") or {}).get(keep.get("detector")) or {}).get("metrics") or {}
    for col, m in (metrics.get("parts") or {}).items():
        row[f"detect_auroc.{col}"] = m.get("auroc")
        row[f"detect_tpr@1%fpr.{col}"] = m.get("tpr@1%fpr")


def merge_rows(cells: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    rows = [cell_row(c) for c in cells]
    asr_cols: list[str] = []
    det_cols: list[str] = []
    split_cols: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith("asr") and k not in asr_cols:
                asr_cols.append(k)
            elif k.startswith("detect_") and k not in det_cols:
                det_cols.append(k)
            elif k.startswith(FIRST_SPLIT_PREFIX) and k not in split_cols:
                split_cols.append(k)
    header = BASE_COLUMNS + asr_cols + det_cols + split_cols + TAIL_COLUMNS
    return header, rows


def detection_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every detector's metrics per ASR column, from every cell that scanned its data (scan-only
    cells first, then detect-then-train cells, each in cell order)."""
    rows = []
    for c in sorted(cells, key=lambda c: c.get("stage") != "scan"):
        det = c.get("detection") or {}
        for name, d in (det.get("detectors") or {}).items():
            m = d.get("metrics")
            if not m:
                continue  # no poisons in this data (a clean attack)
            keep = d.get("keep") or {}
            per_col = m.get("parts") or {c["attack"]: m}
            for col, pm in per_col.items():
                rows.append({
                    "cell": c["cell"], "dataset": c["dataset"], "attack": c["attack"], "column": col,
                    "seed": c["seed"], "stage": c.get("stage"), "method": c.get("method"), "base": det.get("base"),
                    "detector": name, "label": d.get("label", name), "auroc": pm.get("auroc"),
                    "auprc": pm.get("auprc"), "tpr@1%fpr": pm.get("tpr@1%fpr"),
                    "precision@k": pm.get("precision@k"), "n": pm.get("n"), "n_poison": pm.get("n_poison"),
                    "rule_kept": keep.get("kept"),
                    "rule_poisons_kept": (keep.get("poisons_kept_parts") or {}).get(col, keep.get("poisons_kept")),
                    "base_fingerprint": det.get("base_fingerprint")})
    return rows


def write_detection_csv(out: str | Path, rows: list[dict[str, Any]]) -> Path | None:
    """``out/detection.csv`` from ``detection_rows``; removed when the grid has none (a stale file
    from an earlier grid in the same folder would otherwise outlive it)."""
    path = Path(out) / "detection.csv"
    if not rows:
        path.unlink(missing_ok=True)
        return None
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=DETECTION_COLUMNS, extrasaction="raise", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in DETECTION_COLUMNS})
    write_text(path, buf.getvalue())
    return path


def write_results_csv(out: str | Path, cells: list[dict[str, Any]] | None = None) -> Path:
    """Atomically (re)write ``out/results.csv`` from the cell JSONs."""
    out = Path(out)
    cells = load_cells(out) if cells is None else cells
    header, rows = merge_rows(cells)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, extrasaction="raise", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in header})
    path = out / "results.csv"
    write_text(path, buf.getvalue())
    return path


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
