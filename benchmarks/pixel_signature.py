"""Would a pixel-space spectral signature find a backdoor's poisons without suspects?

RoCLIP's and SafeCLIP's pattern veto (clipguard/defenses/pattern_veto.py) estimates a caption
group's shared image pattern from its suspects, the pairs the model ranks riskiest. Once the model
has partly learnt a trigger its poisons stop being suspects, and the veto misses them (Blended on
the Fashion-MNIST test grid, docs/roclip-selection.md). This script asks whether the pattern can be
found without suspects: in each backdoor target's caption group (the target class's pairs and the
poisons), the high-passed pixels are whitened by the shrunk inverse covariance of every training
image's, and each pair is scored by its largest robust |z| on the group's top principal
directions (Tran et al.'s spectral signature, on pixels instead of features). It prints, per
attack part, the AUROC of that score for the part's poisons within the group, how many poisons are
among the group's top-n (n: the poison count), and the ratio of the first two singular values.
Diagnostics only: it reads the attack manifest, which no training choice may do. Run it on a
validation grid's poisoned data (a bench folder's poison/<dataset>/<attack>/seed<s>):

    .venv/bin/python benchmarks/pixel_signature.py runs/roclip-r28/poison/fmnist/four-rotated/seed64 --components 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

MAD_TO_STD = 1.4826


def whitener(precision: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a precision matrix: x @ W has identity covariance."""
    evals, evecs = torch.linalg.eigh(precision.double())
    return evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T


def signature_scores(residuals: torch.Tensor, white: torch.Tensor, components: int) -> tuple[np.ndarray, float]:
    """Each row's largest robust |z| on the top ``components`` principal directions of the whitened,
    centred rows, and the ratio of the first two singular values (near 1: no dominant direction)."""
    x = (residuals.double() - residuals.double().mean(0)) @ white
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    proj = (x @ vt[:components].T).numpy()
    med = np.median(proj, axis=0)
    mad = MAD_TO_STD * np.median(np.abs(proj - med), axis=0)
    z = np.abs(proj - med) / np.where(mad > 0, mad, 1.0)
    return z.max(axis=1), float(s[0] / s[1]) if len(s) > 1 else float("inf")


def main(argv: list[str] | None = None) -> None:
    from clipguard.data.csv_dataset import load_csv
    from clipguard.data.signatures import pixel_residuals
    from clipguard.detection.detectors.pattern import shrunk_precision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("poison_dir", help="a bench seed's poison folder (its part*/manifest.json and train.csv)")
    p.add_argument("--components", type=int, default=1, help="principal directions per group")
    args = p.parse_args(argv)
    root = Path(args.poison_dir)
    manifests = sorted(root.glob("part*/manifest.json"))
    if not manifests:
        raise SystemExit(f"{root}: no part*/manifest.json (expected a bench seed's poison folder)")
    data = load_csv(sorted(root.glob("part*/train.csv"))[-1])  # the last part holds every poison
    labels = np.asarray(data.labels)
    residuals = pixel_residuals(data.images)
    white = whitener(shrunk_precision(residuals, seed=0))
    for path in manifests:
        m = json.loads(path.read_text())
        if m.get("kind") != "backdoor":
            continue
        rows = np.asarray(m["poisoned_rows"])
        group = np.union1d(np.nonzero(labels == m["target"]["index"])[0], rows)
        score, gap = signature_scores(residuals[torch.from_numpy(group)], white, args.components)
        poison = np.isin(group, rows)
        top = np.argsort(-score, kind="stable")[:len(rows)]
        print(f"{m['attack']:8s} target {m['target']['name']:12s} group {len(group):5d}  AUROC "
              f"{roc_auc_score(poison, score):.3f}  poisons in top {len(rows)}: {int(poison[top].sum()):4d}  "
              f"s1/s2 {gap:.2f}")


if __name__ == "__main__":
    main()
