"""Poison-filtering diagnostics, for reporting only.

``make_diagnostics`` turns an attack manifest into a per-epoch hook for the trainer. It reads
what the strategy exposes (``pair_scores()``: its per-pair similarities, ``selected()``: the
safe set) and compares it with the manifest's poisoned rows. Nothing flows back: the strategy
never sees the manifest, and the hook returns numbers for results.jsonl and writes a PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.errors import DataError
from clipguard.io import atomic_path


def auroc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (scikit-learn's); NaN
    when either class is empty."""
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def poison_mask_from_manifest(manifest: dict[str, Any] | str | Path, data: ImageCaptionData) -> torch.Tensor:
    """Bool mask over ``data``: True where the pair is one of the manifest's poisoned rows."""
    from clipguard.attacks.manifest import poison_mask

    return poison_mask(manifest, data).bool()


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise DataError("attack manifest not found", file=str(path))
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", file=str(path), row=e.lineno) from e
    if not isinstance(obj, dict) or "poisoned_rows" not in obj:
        raise DataError("a manifest is a JSON object with 'poisoned_rows'", file=str(path),
                        field="poisoned_rows")
    return obj


def per_part(mask: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per attack part, "k/n": how many of the part's n pairs ``mask`` holds."""
    mask = mask.detach().bool().cpu().flatten()
    return {name: f"{int((mask & m.bool().cpu()).sum())}/{int(m.sum())}" for name, m in parts.items()}


def poison_stats(scores: torch.Tensor | None, selected: torch.Tensor | None, poisoned: torch.Tensor,
                 parts: dict[str, torch.Tensor] | None = None,
                 flagged: torch.Tensor | None = None) -> dict[str, Any]:
    """The per-epoch numbers, one vocabulary for the CLI and the bench.

    ``safe_poison_rate``: share of the safe set that is poison (SafeCLIP Table 12's "safe set
    poison rate"); ``safe_poison_recall``: share of the poisoned pairs that got into the safe
    set; ``safe_poison_in``: per attack part, how many of its pairs are in it (a mixed set's
    total can hide one attack slipping in whole, as a TDPA target's pairs do);
    ``similarity_auroc``: AUROC of the negated pair score as a poison detector. With ``flagged``
    (an image-side veto's pairs): ``flagged_poison_count`` of ``flagged_count`` and, per attack
    part, ``flagged_poison_in``: how precise the veto is, and what it finds of each attack.
    """
    poisoned = poisoned.bool().cpu().flatten()
    n = int(poisoned.numel())
    n_poison = int(poisoned.sum())
    out: dict[str, Any] = {"poison_total": n_poison, "poison_rate": round(n_poison / n, 6) if n else None}
    if selected is not None:
        sel = selected.detach().bool().cpu().flatten()
        if len(sel) != n:
            raise DataError(f"the strategy selected {len(sel)} pairs of data with {n}: the diagnostics' "
                            f"poison mask belongs to another dataset")
        k = int(sel.sum())
        in_safe = int((sel & poisoned).sum())
        out.update({"safe_fraction": round(k / n, 6) if n else None, "safe_poison_count": in_safe,
                    "safe_poison_rate": round(in_safe / k, 6) if k else 0.0,
                    "safe_poison_recall": round(in_safe / n_poison, 6) if n_poison else None})
        if parts:
            out["safe_poison_in"] = per_part(sel, parts)
    if flagged is not None:
        fl = flagged.detach().bool().cpu().flatten()
        out.update({"flagged_count": int(fl.sum()), "flagged_poison_count": int((fl & poisoned).sum())})
        if parts:
            out["flagged_poison_in"] = per_part(fl, parts)
    if scores is not None:
        s = scores.detach().float().cpu()
        # a low similarity flags a poison: AUROC of -similarity as a poison detector
        a = auroc(-s.numpy(), poisoned.numpy())
        out["similarity_auroc"] = None if np.isnan(a) else round(a, 6)  # None: no poison (or no clean) pair
        if n_poison:
            out["poison_similarity_mean"] = round(float(s[poisoned].mean()), 5)
        if n_poison < n:
            out["clean_similarity_mean"] = round(float(s[~poisoned].mean()), 5)
    return out


def similarity_histogram(path: str | Path, scores: torch.Tensor, poisoned: torch.Tensor,
                         selected: torch.Tensor | None = None, title: str = "") -> Path:
    """PNG of clean vs poisoned pair similarities, each normalised (as the paper's Fig. 2/4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = scores.detach().float().cpu().numpy()
    p = poisoned.cpu().numpy().astype(bool)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    bins = np.linspace(float(s.min()), float(s.max()) + 1e-6, 60)
    ax.hist(s[~p], bins=bins, density=True, alpha=0.6, label=f"clean ({int((~p).sum())})", color="tab:blue")
    if p.any():
        ax.hist(s[p], bins=bins, density=True, alpha=0.6, label=f"poisoned ({int(p.sum())})", color="tab:red")
    if selected is not None and bool(selected.any()):
        cut = float(s[selected.cpu().numpy().astype(bool)].min())
        ax.axvline(cut, color="k", ls="--", lw=1, label="safe-set cut")
    ax.set_xlabel("pair score (SafeCLIP: similarity or relative score; RoCLIP: pooled-caption agreement)")
    ax.set_ylabel("density (each group normalised)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def poison_diagnostics(poisoned: torch.Tensor, parts: dict[str, torch.Tensor] | None = None,
                       histograms: bool = True) -> Callable[[Any, int, Path], dict[str, Any]]:
    """Per-epoch hook for the trainer: ``poison_stats`` of what a PairSelector strategy exposes,
    plus a histogram PNG of the pair scores. Strategies that split nothing get the totals only."""
    from clipguard.training.strategy import PairSelector

    poisoned = poisoned.bool().cpu()

    def diagnostics(strategy, epoch: int, out_dir: Path) -> dict[str, Any]:
        selector = isinstance(strategy, PairSelector)
        scores = strategy.pair_scores() if selector else None
        selected = strategy.selected() if selector else None
        rec = poison_stats(scores, selected, poisoned, parts, strategy.flagged() if selector else None)
        if scores is not None and histograms and out_dir is not None:
            name = f"similarity_hist_epoch{epoch + 1:02d}.png"
            auc = rec["similarity_auroc"]
            title = f"{getattr(strategy, 'name', '')} epoch {epoch + 1}: AUROC {auc if auc is not None else float('nan'):.3f}"
            similarity_histogram(Path(out_dir) / name, scores, poisoned, selected, title)
            rec["similarity_hist"] = name
        return rec

    return diagnostics


def make_diagnostics(manifest_path: str | Path, data: ImageCaptionData
                     ) -> Callable[[Any, int, Path], dict[str, Any]]:
    """``poison_diagnostics`` for the poisoned rows an attack manifest names (``--attack-manifest``)."""
    return poison_diagnostics(poison_mask_from_manifest(read_manifest(manifest_path), data))
