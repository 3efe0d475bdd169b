"""The scan's neighbour search at a million pairs: exact against faiss's inverted-file index.

The embeddings are synthetic (``--pairs`` unit vectors of ``--dim`` dimensions that vary along
``--intrinsic`` of them, around ``--clusters`` centres, seeded), since no image-caption data of that size ships with the project;
real embeddings at 60,000 pairs are timed by ``benchmarks/scan_speed.py --neighbour-search ivf``.
The exact search runs on ``--exact-queries`` rows only and its time is scaled to every row (its
cost is linear in the queries); those rows also give the approximate search's recall@k.

With ``--scan`` it then runs every default detector of ``clipguard scan`` on a million synthetic
pairs (image and caption embeddings of ``--dim / 2`` each, the caption a noisy copy of its image's
cluster) with the approximate search, and prints each detector's seconds and the process's peak
memory.

    .venv/bin/python benchmarks/knn_speed.py --pairs 1000000 --k 64
    .venv/bin/python benchmarks/knn_speed.py --pairs 1000000 --scan
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from clipguard.detection.knn import knn
from clipguard.detection.search import NeighbourSearch


def synthetic(pairs: int, dim: int, intrinsic: int, clusters: int, spread: float, seed: int) -> torch.Tensor:
    """Unit vectors around ``clusters`` centres in an ``intrinsic``-dimensional subspace, mapped
    into ``dim`` dimensions, plus a little noise in every dimension: embeddings of a trained model
    vary along far fewer directions than they have (an isotropic cloud in 128 dimensions is the
    worst case of any index, and unlike them)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, intrinsic, generator=g)
    lift = torch.randn(intrinsic, dim, generator=g) / intrinsic ** 0.5
    which = torch.randint(0, clusters, (pairs,), generator=g)
    x = torch.empty(pairs, dim)
    for i in range(0, pairs, 100_000):  # bounded scratch memory
        c = which[i:i + 100_000]
        z = centres[c] + spread * torch.randn(len(c), intrinsic, generator=g)
        x[i:i + len(c)] = z @ lift + 0.05 * torch.randn(len(c), dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128, help="128: the joint space of a 64-d model")
    p.add_argument("--intrinsic", type=int, default=16, help="dimensions the data varies along")
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--spread", type=float, default=0.5, help="spread around each centre (unit-variance centres)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=None, help="default: the scan's (32, or a 64th of the cells)")
    p.add_argument("--exact-queries", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan", action="store_true", help="also run every default detector with the approximate search")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x = synthetic(args.pairs, args.dim, args.intrinsic, args.clusters, args.spread, args.seed)
    search = NeighbourSearch(method="ivf", nprobe=args.nprobe, recall_sample=0, seed=args.seed)

    t0 = time.perf_counter()
    _, found, info = search.find(x, args.k, "l2")
    ivf_s = time.perf_counter() - t0

    q = torch.randperm(args.pairs, generator=torch.Generator().manual_seed(args.seed))[:args.exact_queries]
    t0 = time.perf_counter()
    _, near = knn(x[q], x, args.k + 1, metric="l2")  # the scan's own exact routine, on these rows
    exact_sample_s = time.perf_counter() - t0
    exact_s = exact_sample_s * args.pairs / len(q)
    true = torch.stack([row[row != i][:args.k] for row, i in zip(near, q)])  # the row itself is not its neighbour
    recall = float((true.unsqueeze(2) == found[q].unsqueeze(1)).any(dim=2).float().mean())
    res = {"pairs": args.pairs, "dim": args.dim, "k": args.k, "threads": torch.get_num_threads(),
           "ivf_seconds": ivf_s, "nlist": info["nlist"], "nprobe": info["nprobe"],
           "exact_seconds_estimated": exact_s, "exact_queries_timed": len(q), "speed_up": exact_s / ivf_s,
           "recall_at_k": recall, "recall_queries": len(q)}
    print(f"{args.pairs} synthetic unit vectors, {args.dim}-d ({args.intrinsic} intrinsic), {args.clusters} clusters, k = {args.k}, "
          f"{res['threads']} threads")
    print(f"exact (the scan's default): {exact_s:.0f} s, scaled from {len(q)} queries timed ({exact_sample_s:.1f} s)")
    print(f"ivf (nlist {info['nlist']}, nprobe {info['nprobe']}): {ivf_s:.0f} s, recall@{args.k} {recall:.4f} "
          f"on {len(q)} queries; {exact_s / ivf_s:.1f}x faster")
    if args.scan:
        del x, found, near, true
        res["scan"] = scan_detectors(args)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


def scan_detectors(args: argparse.Namespace) -> dict:
    """Every default detector on synthetic pairs, with the approximate search: seconds, memory."""
    from clipguard.detection import PairFeatures
    from clipguard.detection.runner import resolve_detectors, scan_features

    half = args.dim // 2
    image = synthetic(args.pairs, half, args.intrinsic, args.clusters, args.spread, args.seed)
    noise = synthetic(args.pairs, half, args.intrinsic, args.clusters, args.spread, args.seed + 1)
    text = torch.nn.functional.normalize(image + 0.7 * noise, dim=1)
    del noise
    features = PairFeatures(image, text, search=NeighbourSearch(method="ivf", nprobe=args.nprobe, seed=args.seed))
    dets = resolve_detectors(None, None)
    t0 = time.perf_counter()
    result = scan_features(features, dets, keep_detector="dao", progress=False)
    total = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"seconds": total, "peak_memory_mb": peak_mb, "searches": features.searches(),
           "detectors": {r.name: {"seconds": r.seconds, "search_seconds": r.knn_seconds} for r in result.runs}}
    print(f"\nevery default detector on {args.pairs} synthetic pairs ({half}-d image and caption embeddings), "
          f"approximate search: {total:.0f} s, peak memory {peak_mb / 1024:.1f} GB")
    for name, rec in out["detectors"].items():
        print(f"  {name:<18} {rec['seconds']:7.1f} s (+ the shared search: {rec['search_seconds']:.1f} s)")
    for space, rec in out["searches"].items():
        print(f"  search {space}: {rec['seconds']:.0f} s, recall@{rec['k']} {rec.get('recall_at_k')}")
    return out


if __name__ == "__main__":
    main()
