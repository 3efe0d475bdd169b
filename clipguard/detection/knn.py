"""Exact k nearest neighbours of L2-normalised embeddings, in bounded memory.

The query is cut into blocks of ``chunk`` rows and the reference into blocks of ``ref_chunk``
rows; each block pair is one matrix product, and a running top-k per query row keeps only the
``k`` best candidates seen so far. Memory is ``chunk x ref_chunk`` similarities plus the running
top-k, whatever the size of the data, so a million pairs against a million pairs is one pass of
block products (on the GPU when the tensors are there, or when ``device`` says so).

Distances of unit vectors follow from their dot product s: cosine distance ``1 - s`` and L2
distance ``sqrt(2 - 2 s)``. Both order neighbours the same way; they differ in the values the
density detectors take ratios and logarithms of. ``euclidean`` is the plain L2 distance of
vectors that are not normalised (pixel signatures): the blocks rank ``a.b - |b|^2 / 2``, which
orders neighbours as ``|a - b|`` does, and the k found are measured again as ``|a - b|`` (the
expanded form loses near-copies' distances to rounding).
"""

from __future__ import annotations

from typing import Literal

import torch

Metric = Literal["cosine", "l2", "euclidean"]
METRICS = ("cosine", "l2", "euclidean")


def similarity_to_distance(sim: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance of unit vectors from their dot product (clamped: rounding can push s above 1)."""
    if metric == "cosine":
        return (1.0 - sim).clamp_min(0.0)
    if metric == "l2":
        return (2.0 - 2.0 * sim).clamp_min(0.0).sqrt()
    raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


@torch.no_grad()
def knn(query: torch.Tensor, reference: torch.Tensor, k: int, *, metric: str = "cosine",
        exclude_self: bool = False, chunk: int = 4096, ref_chunk: int = 16384,
        device: str | torch.device | None = None, normalize: bool = True
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (n, k) and indices (n, k) of the ``k`` nearest rows of ``reference`` to each row
    of ``query``, nearest first.

    ``exclude_self``: the query IS the reference (row i of both is the same item), and an item is
    not its own neighbour. ``normalize``: L2-normalise both sides first (a no-op for CLIP
    features, which are; ignored by ``euclidean``, which measures the vectors as they are). The products run on ``device`` (default: the query's device) in
    float32; results come back on the query's device.
    Among equally distant neighbours, which index is returned is unspecified.
    """
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"query and reference must be (n, d) with the same d, got "
                         f"{tuple(query.shape)} and {tuple(reference.shape)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    n, m = query.shape[0], reference.shape[0]
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs the query to be the reference, got {n} and {m} rows")
    available = m - 1 if exclude_self else m
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] for {m} reference rows"
                         f"{' (minus the item itself)' if exclude_self else ''}, got {k}")
    if chunk < 1 or ref_chunk < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {chunk} and {ref_chunk}")
    out_device = query.device
    dev = torch.device(device) if device is not None else query.device
    euclidean = metric == "euclidean"
    normalize = normalize and not euclidean
    ref = reference.to(dev, torch.float32)
    if normalize:
        ref = torch.nn.functional.normalize(ref, dim=1)
    bias = -0.5 * ref.pow(2).sum(dim=1) if euclidean else None
    dists, idxs = [], []
    for qs in range(0, n, chunk):
        q = query[qs:qs + chunk].to(dev, torch.float32)
        if normalize:
            q = torch.nn.functional.normalize(q, dim=1)
        best_s, best_i = _block_topk(q, ref, k, qs if exclude_self else None, ref_chunk, bias)
        if euclidean:  # measured again from the vectors: |q|^2 - 2 s cancels for near-copies
            d = (q[:, None, :] - ref[best_i]).norm(dim=2)
            d, order = d.sort(dim=1)
            best_i = best_i.gather(1, order)
        else:
            d = similarity_to_distance(best_s, metric)
        dists.append(d.to(out_device))
        idxs.append(best_i.to(out_device))
    return torch.cat(dists), torch.cat(idxs)


def _block_topk(q: torch.Tensor, ref: torch.Tensor, k: int, self_offset: int | None,
                ref_chunk: int, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k (largest similarity, plus ``bias`` of each reference row) of one query block
    over the reference blocks."""
    rows = torch.arange(q.shape[0], device=q.device)
    best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for rs in range(0, ref.shape[0], ref_chunk):
        sim = q @ ref[rs:rs + ref_chunk].T
        if bias is not None:
            sim += bias[rs:rs + ref_chunk]
        if self_offset is not None:
            cols = rows + self_offset - rs  # the item's own column inside this block, if there
            inside = (cols >= 0) & (cols < sim.shape[1])
            sim[rows[inside], cols[inside]] = float("-inf")
        kk = min(k, sim.shape[1])
        s, i = sim.topk(kk, dim=1)
        cand_s = torch.cat([best_s, s], dim=1)
        cand_i = torch.cat([best_i, i + rs], dim=1)
        best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)  # sorted, largest first
        best_i = cand_i.gather(1, pos)
    return best_s, best_i
