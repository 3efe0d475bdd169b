"""Which number of an attack-metrics dict is the headline ASR of Table 1, and under what protocol.

``clipguard.evaluation.asr`` returns nested dicts (zero-shot ASR@k, TDPA success, linear-probe
ASR, each with its protocol). Table 1 shows one number per attack: the TDPA success rate for
targeted poisoning, the zero-shot ASR@1 for backdoors; the metric's path and sample size travel
with it, so no table number is without its protocol.
"""

from __future__ import annotations

from typing import Any


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = obj
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Candidate paths, most specific first; the first numeric one wins.
CANDIDATES = {
    "tdpa": ["tdpa.asr", "tdpa_asr", "zeroshot.tdpa_asr", "zeroshot.asr@1", "zeroshot.asr1", "asr@1", "asr1",
             "asr"],
    "backdoor": ["zeroshot.asr@1", "zeroshot.asr1", "zeroshot.asr.1", "zeroshot.top1", "asr@1", "asr1",
                 "asr_top1", "asr"],
}
N_KEYS = ["n_images", "n", "count"]


def pick_headline(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    flat = flatten(raw)
    lower = {k.lower(): k for k in flat}
    for cand in CANDIDATES.get(kind, CANDIDATES["backdoor"]):
        key = lower.get(cand)
        if key is not None and _is_num(flat[key]):
            return {"value": float(flat[key]), "metric": f"{kind}: {key}", "n": _sample_size(flat, key)}
    return {"value": None, "metric": f"{kind}: not found in {sorted(flat)[:12]}", "n": None}


def _sample_size(flat: dict[str, Any], key: str) -> int | None:
    """The sample count stored beside the metric (same parent), else at the top level."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    for prefix in ([parent] if parent else []) + [""]:
        for n in N_KEYS:
            k = f"{prefix}.{n}" if prefix else n
            if _is_num(flat.get(k)):
                return int(flat[k])
    return None
