"""How well a detector's scores separate poisoned from clean pairs (scikit-learn's estimators).

- ``auroc``: area under the ROC curve.
- ``auprc``: average precision (area under the precision-recall curve, without interpolation).
- ``tpr_at_fpr``: the largest true-positive rate of any threshold whose false-positive rate is
  at most ``fpr`` (1% by default), read off the ROC curve.
- ``precision_at_k``: share of poisons among the k highest scores, k = the number of poisons
  (equal scores: the earlier pair ranks first).

Per attack part, the positives are that part's poisons and the negatives the clean pairs (other
parts' poisons are left out), so one part that hides well is not averaged away.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    return s, y


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any()) and not bool(y.all())


def auroc(scores, labels) -> float:
    """NaN when either class is empty."""
    from sklearn.metrics import roc_auc_score

    s, y = _arrays(scores, labels)
    return float(roc_auc_score(y, s)) if _both_classes(y) else float("nan")


def auprc(scores, labels) -> float:
    """Average precision; NaN when either class is empty."""
    from sklearn.metrics import average_precision_score

    s, y = _arrays(scores, labels)
    return float(average_precision_score(y, s)) if _both_classes(y) else float("nan")


def tpr_at_fpr(scores, labels, fpr: float = 0.01) -> float:
    """Largest TPR over thresholds with FPR <= ``fpr``; NaN when either class is empty."""
    from sklearn.metrics import roc_curve

    s, y = _arrays(scores, labels)
    if not _both_classes(y):
        return float("nan")
    f, t, _ = roc_curve(y, s, drop_intermediate=False)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def precision_at_k(scores, labels, k: int | None = None) -> float:
    """Share of positives among the ``k`` highest scores (default k: the number of positives)."""
    s, y = _arrays(scores, labels)
    k = int(y.sum()) if k is None else int(k)
    if k <= 0:
        return float("nan")
    top = np.argsort(-s, kind="stable")[:k]
    return float(y[top].mean())


def detection_metrics(scores, labels) -> dict[str, Any]:
    """AUROC, AUPRC, TPR@1%FPR and precision@k (k = number of poisons), with the counts."""
    s, y = _arrays(scores, labels)
    out: dict[str, Any] = {"auroc": auroc(s, y), "auprc": auprc(s, y), "tpr@1%fpr": tpr_at_fpr(s, y, 0.01),
                           "precision@k": precision_at_k(s, y)}
    out = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}
    out.update({"n": int(y.size), "n_poison": int(y.sum())})
    return out


def grouped_metrics(scores, poisoned, parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """``detection_metrics`` overall and, with ``parts`` (name -> mask of that part's poisons),
    per part against the clean pairs."""
    s, y = _arrays(scores, poisoned)
    out = detection_metrics(s, y)
    if parts:
        out["parts"] = {}
        for name, mask in parts.items():
            m = np.asarray(mask).astype(bool).reshape(-1)
            if m.shape != y.shape:
                raise ValueError(f"part '{name}': {m.size} flags for {y.size} pairs")
            use = m | ~y
            out["parts"][name] = detection_metrics(s[use], m[use])
    return out
