"""Matplotlib (Agg) figures of a grid, returned as PNG bytes so the HTML report can embed them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def png_bytes(fig) -> bytes:
    """``fig`` as PNG bytes (no timestamp or software in the metadata: equal figures, equal files);
    closes it. Used by the report's figures and by the detection scan's (detection/plots.py)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def panel_grid(n: int, panel_height: float):
    """A figure of ``n`` panels, at most 4 a row (3.2 wide, ``panel_height`` high each); the
    axes left over in the last row are switched off. Returns (fig, axes) with axes a 2-D array."""
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, panel_height * rows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def _groups(cells: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for c in cells:
        k = (c["dataset"], c["attack"])
        if k not in seen:
            seen.append(k)
    return seen


def safe_set_plot(cells: list[dict[str, Any]], method_order: list[str]) -> dict[str, bytes]:
    """Per (dataset, attack): % of the poisoned pairs inside the safe set per epoch (solid) and the
    safe set's share of the data (dashed), mean over seeds, one line per defence that has one."""
    figs = {}
    for d, a in _groups(cells):
        sel = [c for c in cells if c["dataset"] == d and c["attack"] == a
               and any("safe_poison_recall" in r for r in c.get("epochs", []))]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for m in [m for m in method_order if any(c["method"] == m for c in sel)]:
            per_epoch: dict[int, list[tuple[float, float]]] = {}
            for c in sel:
                if c["method"] != m:
                    continue
                for r in c["epochs"]:
                    if "safe_poison_recall" in r:
                        per_epoch.setdefault(int(r["epoch"]), []).append((r["safe_poison_recall"], r["safe_fraction"]))
            xs = sorted(per_epoch)
            kept = [100 * sum(v[0] for v in per_epoch[x]) / len(per_epoch[x]) for x in xs]
            frac = [100 * sum(v[1] for v in per_epoch[x]) / len(per_epoch[x]) for x in xs]
            line, = ax.plot(xs, kept, marker="o", label=f"{m}: poisons in safe set")
            ax.plot(xs, frac, ls="--", color=line.get_color(), label=f"{m}: safe set size")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("% (mean over seeds)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{d} / {a}: safe set over epochs")
        ax.legend(fontsize=7)
        figs[f"safe_set__{d}__{a}"] = png_bytes(fig)
    return figs


def histogram_plot(cells: list[dict[str, Any]], method_order: list[str]) -> dict[str, bytes]:
    """Per (dataset, attack): distribution of image-caption cosine similarity of training pairs
    under each final model, clean vs poisoned pairs (densities, first seed)."""
    figs = {}
    for d, a in _groups(cells):
        sel = [c for c in cells if c["dataset"] == d and c["attack"] == a and c.get("similarity_histogram")]
        if not sel:
            continue
        seed0 = min(c["seed"] for c in sel)
        sel = [c for c in sel if c["seed"] == seed0]
        methods = [m for m in method_order if any(c["method"] == m for c in sel)]
        fig, axes = panel_grid(len(methods), 2.7)
        for ax, m in zip(axes.flat, methods):
            h = next(c for c in sel if c["method"] == m)["similarity_histogram"]
            edges = h["edges"]
            centers = [(edges[i] + edges[i + 1]) / 2 for i in range(len(edges) - 1)]
            width = edges[1] - edges[0]
            for part, colour in (("clean", "tab:blue"), ("poisoned", "tab:red")):
                counts = h[part]["counts"]
                tot = sum(counts)
                if tot:
                    ax.bar(centers, [v / tot for v in counts], width=width, alpha=0.55, color=colour,
                           label=f"{part} (n={tot})")
            ax.set_title(m, fontsize=9)
            ax.set_xlabel("cosine similarity", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
        fig.suptitle(f"{d} / {a}: pair similarity after training (seed {seed0}, normalised)", fontsize=10)
        figs[f"similarity__{d}__{a}"] = png_bytes(fig)
    return figs


def first_split_histograms(out: Path | str, cells: list[dict[str, Any]], method_order: list[str]) -> dict[str, bytes]:
    """Per (dataset, attack) and pair-selecting defence: the clean-vs-poisoned histogram of its pair
    scores at the first split after the warm-up (SafeCLIP: the first mixed epoch), lowest seed. These
    are the PNGs the run's diagnostics already wrote (``similarity_hist_epochNN.png`` in the run
    folder), taken as they are; a cell whose run folder no longer has it is skipped."""
    from clipguard.reporting.merge import first_split

    figs: dict[str, bytes] = {}
    for d, a in _groups(cells):
        sel = [c for c in cells if c["dataset"] == d and c["attack"] == a]
        for m in [m for m in method_order if any(c["method"] == m for c in sel)]:
            for c in sorted((c for c in sel if c["method"] == m), key=lambda c: c["seed"]):
                name = (first_split(c) or {}).get("similarity_hist")
                path = Path(out) / c.get("run_dir", "") / str(name)
                if name and Path(name).name == name and c.get("run_dir") and path.is_file():
                    figs[f"first_split__{d}__{a}__{m}"] = path.read_bytes()
                    break
    return figs
