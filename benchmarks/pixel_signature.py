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

A veto would see caption groups, not whole classes, and would have to spare groups without a
pattern. ``--group-rows N`` splits each group at random into parts of about N rows and scores each
part alone (what a veto with groups of that size sees; the veto's 50 caption groups on 10,000
pairs hold about 200 rows). ``--clean`` also scores every class without poisons (its own rows, the
poisons made from them taken out) and reports how many of its rows a veto would flag. ``--cut`` and
``--gap`` are that veto: a row is flagged when its score exceeds the cut in a group whose s1/s2 is
at least the gap. ``--neighbours K`` also scores every row, over the whole data and without groups,
by its mean cosine to its K nearest whitened residuals (do the poisons of one pattern form a cluster?),
and prints that score's AUROC for each attack part's poisons against the clean rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

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


def neighbour_scores(residuals: torch.Tensor, white: torch.Tensor, k: int, chunk: int = 2048) -> np.ndarray:
    """Each row's mean cosine similarity to its ``k`` nearest other rows, whitened and centred."""
    x = ((residuals.double() - residuals.double().mean(0)) @ white).float()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = []
    for i in range(0, len(x), chunk):
        sims = x[i:i + chunk] @ x.T
        rows = torch.arange(len(sims))
        sims[rows, rows + i] = -2.0  # not its own neighbour
        out.append(sims.topk(min(k, len(x) - 1), dim=1).values.mean(dim=1))
    return torch.cat(out).numpy()


def groups_of(rows: np.ndarray, group_rows: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """``rows`` whole (None), or split at random into parts of about ``group_rows`` rows (sorted)."""
    if group_rows is None or len(rows) < 2 * group_rows:
        return [rows]
    shuffled = rng.permutation(rows)
    return [np.sort(part) for part in np.array_split(shuffled, len(rows) // group_rows)]


def main(argv: list[str] | None = None) -> None:
    from clipguard.data.csv_dataset import load_csv
    from clipguard.data.signatures import pixel_residuals
    from clipguard.detection.detectors.pattern import shrunk_precision
    from clipguard.evaluation.detection import auroc, read_manifest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("poison_dir", help="a bench seed's poison folder (its part*/manifest.json and train.csv)")
    p.add_argument("--components", type=int, default=1, help="principal directions per group")
    p.add_argument("--group-rows", type=int, help="score random parts of about this many rows of each group")
    p.add_argument("--clean", action="store_true", help="also score every class that holds no poisons")
    p.add_argument("--cut", type=float, default=4.0, help="the veto's score cut (robust |z|)")
    p.add_argument("--gap", type=float, default=1.0, help="the veto's smallest s1/s2")
    p.add_argument("--seed", type=int, default=0, help="for --group-rows")
    p.add_argument("--neighbours", type=int, help="also the nearest-neighbour score's AUROC, K neighbours")
    args = p.parse_args(argv)
    root = Path(args.poison_dir)
    manifests = sorted(root.glob("part*/manifest.json"))
    if not manifests:
        raise SystemExit(f"{root}: no part*/manifest.json (expected a bench seed's poison folder)")
    data = load_csv(sorted(root.glob("part*/train.csv"))[-1])  # the last part holds every poison
    labels = np.asarray(data.labels)
    residuals = pixel_residuals(data.images)
    white = whitener(shrunk_precision(residuals, seed=0))
    rng = np.random.default_rng(args.seed)
    parts = [read_manifest(path) for path in manifests]
    poisoned = np.zeros(len(labels), dtype=bool)
    targets = set()
    for m in parts:
        poisoned[np.asarray(m["poisoned_rows"], dtype=np.int64)] = True
        targets.add(m["target"]["index"])

    def report(name: str, group: np.ndarray, rows: np.ndarray) -> None:
        for part in groups_of(group, args.group_rows, rng):
            score, gap = signature_scores(residuals[torch.from_numpy(part)], white, args.components)
            poison = np.isin(part, rows)
            flagged = (score > args.cut) & (gap >= args.gap)
            line = f"{name:30s} group {len(part):5d}  s1/s2 {gap:.3f}  flagged {int(flagged.sum()):4d}"
            if poison.any():
                top = np.argsort(-score, kind="stable")[:int(poison.sum())]
                line += (f" ({int((flagged & poison).sum())} of its {int(poison.sum())} poisons)  AUROC {auroc(score, poison):.3f}"
                         f"  poisons in top {int(poison.sum())}: {int(poison[top].sum())}")
            print(line)

    for m in parts:
        if m.get("kind") != "backdoor":
            continue
        rows = np.asarray(m["poisoned_rows"])
        group = np.union1d(np.nonzero((labels == m["target"]["index"]) & ~poisoned)[0], rows)
        report(f"{m['attack']} target {m['target']['name']}", group, rows)
    if args.neighbours:
        near = neighbour_scores(residuals, white, args.neighbours)
        for m in parts:
            rows = np.asarray(m["poisoned_rows"])
            sel = ~poisoned
            sel[rows] = True
            print(f"{m['attack']} target {m['target']['name']}: mean cosine to {args.neighbours} nearest, AUROC "
                  f"{auroc(near[sel], np.isin(np.nonzero(sel)[0], rows)):.3f} against the clean rows")
    if args.clean:
        for c in sorted(set(labels.tolist()) - targets):
            report(f"clean class {c}", np.nonzero((labels == c) & ~poisoned)[0], np.empty(0, dtype=np.int64))


if __name__ == "__main__":
    main()
