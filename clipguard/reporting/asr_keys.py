"""Which numbers of ``clipguard.evaluation.asr.asr_for_model``'s result go into Table 1.

That result holds a ``zeroshot`` block (and ``linear_probe`` with a probe set), each with
``asr@1`` (for TDPA: fraction of target images predicted as the adversarial class; for backdoors:
fraction of triggered non-target-class images predicted as the target) and a ``protocol`` with
``n_images``, the successes (``n_success@1``; TDPA: ``n_success``) and the 95% Wilson interval
``asr@1_ci95``. Table 1 shows zero-shot ASR@1, like SafeCLIP; the metric's name, sample size,
successes and interval travel with the value so no table number is without its protocol.
"""

from __future__ import annotations

from typing import Any

from clipguard.attacks.base import is_targeted

TARGETED_METRIC = "TDPA success (top-1 = adversarial class)"


def is_targeted_column(rows: list[dict[str, Any]], col: str) -> bool:
    """Whether result rows' column ``col`` measures targeted poisoning (targets taken, not images):
    its metric name is the one ``_block`` writes for a targeted attack."""
    return any(TARGETED_METRIC in str(r.get(f"asr_metric.{col}") or "") for r in rows)


def _block(raw: dict[str, Any], name: str, kind: str) -> dict[str, Any]:
    block = raw.get(name) or {}
    value = block.get("asr@1")
    proto = block.get("protocol") or {}
    what = TARGETED_METRIC if is_targeted(kind) else "backdoor ASR@1"
    hits = block.get("n_success@1", block.get("n_success"))
    return {"value": float(value) if isinstance(value, (int, float)) else None,
            "metric": f"{name} {what}", "n": proto.get("n_images"),
            "hits": hits if isinstance(hits, int) else None, "ci95": block.get("asr@1_ci95")}


def pick_headline(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """Zero-shot ASR@1 with its sample size."""
    return _block(raw, "zeroshot", kind)


def pick_linear_probe(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """Linear-probe ASR@1 (None when no probe set was given)."""
    return _block(raw, "linear_probe", kind)


def pick_base_rate(raw: dict[str, Any]) -> float | None:
    """Zero-shot ``clean_rate@1``: how often the SAME held-out images without the trigger are
    already predicted as the target. An ASR near this base rate means the backdoor did nothing."""
    v = (raw.get("zeroshot") or {}).get("clean_rate@1")
    return float(v) if isinstance(v, (int, float)) else None
