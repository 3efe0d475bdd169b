"""Which defence holds against which attack: each defended method's ASR read against the base rate
and against the undefended model, by one stated rule.

A defence "holds" on a column when its mean ASR is at most ``tolerance`` above the base rate: the
same method trained on clean data and measured on the same triggered images when the grid has it
(a defence that costs accuracy may confuse look-alike classes more than plain CLIP does, which is
not a poisoning), else the undefended model trained on clean data, else the undefended model's
rate on the same images without the trigger. A column where the undefended model itself
stays within the tolerance is an attack that did not take at that dose: nothing there to hold
against. Tolerances: 2 points for a backdoor (ASR over hundreds of triggered images) and 12.5
points, one target in eight, for targeted poisoning (a handful of target images per seed).
"""

from __future__ import annotations

from typing import Any

from clipguard.reporting.asr_keys import is_targeted_column
from clipguard.reporting.tables import Table, _ordered, asr_column_groups, mean_std

BACKDOOR_TOLERANCE = 0.02
TARGETED_TOLERANCE = 0.125


def _undefended(r: dict[str, Any]) -> bool:
    return (r.get("defense") in (None, "", "none") and not r.get("detect_detector")
            and not r.get("base") and r.get("train_data") == "poisoned")


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    m, _, n = mean_std([r.get(key) if r.get(key) not in ("", None) else None for r in rows])
    return m if n else None


def tolerance(rows: list[dict[str, Any]], col: str) -> float:
    return TARGETED_TOLERANCE if is_targeted_column(rows, col) else BACKDOOR_TOLERANCE


def verdict_table(rows: list[dict[str, Any]], method_order: list[str] | None = None) -> Table | None:
    """Rows = defended methods, columns = (dataset, attack column); None when the grid has no
    undefended model or no defended one to compare."""
    body_methods = _ordered([r["method"] for r in rows if r.get("train_data") == "poisoned"
                             and not _undefended(r)], method_order)
    if not body_methods or not any(_undefended(r) for r in rows):
        return None
    groups, header, spans = asr_column_groups(rows)
    # per column, what every method is read against: the undefended model's ASR, its base rate
    # and the tolerance; per method only its own clean-data rate differs
    refs: dict[tuple[str, str], tuple[list[dict[str, Any]], float | None, float | None, float]] = {}
    for d, cols in groups:
        for c in cols:
            here = [r for r in rows if r["dataset"] == d and r.get(f"asr.{c}") not in (None, "")]
            und = [r for r in here if _undefended(r)]
            clean = [r for r in here if r.get("train_data") == "clean"
                     and r.get("defense") in (None, "", "none") and not r.get("base")]
            und_base = _mean(clean, f"asr.{c}") if clean else _mean(und, f"asr_base.{c}")
            refs[(d, c)] = (here, _mean(und, f"asr.{c}"), und_base, tolerance(here, c))
    body = []
    for m in body_methods:
        line = [m]
        for d, cols in groups:
            for c in cols:
                here, undefended, und_base, tol = refs[(d, c)]
                own = [r for r in here if r.get("train_data") == "clean" and r["method"] == m]
                base = _mean(own, f"asr.{c}") if own else und_base
                line.append(_cell(rows, d, c, m, undefended, und_base, base, tol))
        body.append(line)
    notes = ["'holds': the method's mean ASR is within the tolerance of the base rate; 'breaks': it is not "
             "(the undefended model's ASR in brackets); 'did not take': the undefended model itself stays "
             "within the tolerance, so the column says nothing about the defence.",
             f"Tolerance: {BACKDOOR_TOLERANCE * 100:g} points for a backdoor, {TARGETED_TOLERANCE * 100:g} "
             "points (one target in eight) for targeted poisoning. Base rate: the same method trained on the "
             "clean data, measured on the same images, else the undefended model trained on it, else the "
             "undefended model's rate on the images without the trigger.",
             "ASR only: a method that holds by losing accuracy shows it in the accuracy table."]
    return Table("Which defence holds: ASR@1 against the base rate (%)", header, body, spans, notes)


def _cell(rows: list[dict[str, Any]], d: str, c: str, m: str, undefended: float | None,
          undefended_base: float | None, base: float | None, tol: float) -> str:
    """``undefended_base`` decides whether the attack took at all; ``base`` (the method's own
    clean-data rate when measured) whether the method held."""
    mine = [r for r in rows if r["dataset"] == d and r["method"] == m and r.get("train_data") == "poisoned"]
    asr = _mean(mine, f"asr.{c}")
    if asr is None or undefended is None or base is None or undefended_base is None:
        return "-"
    if undefended - undefended_base <= tol:
        return f"did not take (undefended {undefended * 100:.1f}, base {undefended_base * 100:.1f})"
    verdict = "holds" if asr - base <= tol else "breaks"
    return f"{verdict}: {asr * 100:.1f} (undefended {undefended * 100:.1f}, base {base * 100:.1f})"
