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
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (ties count half).

    Mann-Whitney form: the probability that a random positive outranks a random negative.
    NaN when either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def poison_mask_from_manifest(manifest: dict[str, Any] | str | Path, data: ImageCaptionData) -> torch.Tensor:
    """Bool mask over ``data``: True where the pair is one of the manifest's poisoned rows."""
    try:
        from clipguard.attacks.manifest import poison_mask

        return poison_mask(manifest, data).bool()
    except ImportError:
        pass
    if not isinstance(manifest, dict):
        manifest = read_manifest(manifest)
    rows = {int(r) + 2 for r in manifest.get("poisoned_rows", [])}  # 0-based data row -> CSV line
    return torch.tensor([int(line) in rows for line in data.rows], dtype=torch.bool)


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


def poison_stats(scores: torch.Tensor | None, selected: torch.Tensor | None,
                 poisoned: torch.Tensor) -> dict[str, Any]:
    """The numbers reported per epoch, given the strategy's scores/safe set and the truth."""
    n = int(poisoned.numel())
    n_poison = int(poisoned.sum())
    out: dict[str, Any] = {"poison_total": n_poison,
                           "initial_poison_rate": round(n_poison / n, 6) if n else None}
    if selected is not None:
        sel = selected.bool().cpu()
        k = int(sel.sum())
        in_safe = int((sel & poisoned).sum())
        out.update({"poison_in_safe": in_safe,
                    "safe_poison_rate": round(in_safe / k, 6) if k else 0.0,
                    "poison_safe_recall": round(in_safe / n_poison, 6) if n_poison else None})
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
    ax.set_xlabel("cosine similarity of the clean (non-augmented) pair")
    ax.set_ylabel("density (each group normalised)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def make_diagnostics(manifest_path: str | Path, data: ImageCaptionData
                     ) -> Callable[[Any, int, Path], dict[str, Any]]:
    """Per-epoch hook: poison counts in the safe set, its poison rate, AUROC, histogram PNGs."""
    manifest = read_manifest(manifest_path)
    poisoned = poison_mask_from_manifest(manifest, data)

    def diagnostics(strategy, epoch: int, out_dir: Path) -> dict[str, Any]:
        scores = strategy.pair_scores()
        selected = strategy.selected()
        rec = poison_stats(scores, selected, poisoned)
        if scores is not None:
            name = f"similarity_hist_epoch{epoch + 1:02d}.png"
            title = (f"{getattr(strategy, 'name', '')} epoch {epoch + 1}: AUROC "
                     f"{rec['similarity_auroc'] if rec['similarity_auroc'] is not None else float('nan'):.3f}")
            similarity_histogram(Path(out_dir) / name, scores, poisoned, selected, title)
            rec["similarity_hist"] = name
        return rec

    return diagnostics
