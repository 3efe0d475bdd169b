"""Figures of a scan with a manifest: score histograms (clean vs poisoned) and ROC curves.

Matplotlib with the Agg backend, set up as the report's figures are (reporting/plots.py); each
figure comes back as PNG bytes (no timestamp in the metadata, so equal scans give equal files)
for the caller to write atomically.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from clipguard.reporting.plots import panel_grid, plt, png_bytes


def score_histograms(names: Sequence[str], scores: Sequence[np.ndarray], poisoned: np.ndarray,
                     aurocs: Sequence[float | None]) -> bytes:
    """One panel per detector: densities of clean and poisoned pairs' scores (each normalised)."""
    fig, axes = panel_grid(len(names), 2.6)
    p = np.asarray(poisoned, dtype=bool)
    for ax, name, s, auc in zip(axes.flat, names, scores, aurocs):
        s = np.asarray(s, dtype=np.float64)
        lo, hi = float(np.min(s)), float(np.max(s))
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
        ax.hist(s[~p], bins=bins, density=True, alpha=0.6, color="tab:blue", label=f"clean ({int((~p).sum())})")
        if p.any():
            ax.hist(s[p], bins=bins, density=True, alpha=0.6, color="tab:red", label=f"poisoned ({int(p.sum())})")
        title = name if auc is None else f"{name}: AUROC {auc:.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("score (higher: more suspicious)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return png_bytes(fig)


def roc_plot(names: Sequence[str], scores: Sequence[np.ndarray], poisoned: np.ndarray,
             aurocs: Sequence[float | None]) -> bytes:
    """ROC curve of every detector on one axis, with the chance diagonal."""
    from sklearn.metrics import roc_curve

    y = np.asarray(poisoned, dtype=bool)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for name, s, auc in zip(names, scores, aurocs):
        fpr, tpr, _ = roc_curve(y, np.asarray(s, dtype=np.float64))
        ax.plot(fpr, tpr, label=name if auc is None else f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1)
    ax.set_xlabel("false-positive rate (clean pairs flagged)")
    ax.set_ylabel("true-positive rate (poisons flagged)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(f"poison detection ({int(y.sum())} poisoned of {y.size} pairs)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)
