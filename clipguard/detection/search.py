"""How a scan finds each pair's nearest neighbours: exactly, or approximately with faiss.

The exact search (``detection.knn``) compares every pair with every other: 60,000 pairs take
about 12 s on two CPU cores, but the cost grows with the square of the data (about an hour for a
million pairs on the same CPU). ``method: ivf`` hands the search to faiss's inverted-file index
(the optional dependency ``faiss-cpu``): k-means cells over the data, and each query compares
itself only with the pairs of its ``nprobe`` nearest cells. The price is recall: a true
neighbour in a cell that was not probed is missed, and the one found instead is a little
farther. So every approximate search is checked against the exact one on a sample of queries,
and the share of true neighbours found (recall@k) goes into scan.json beside the scores.

On a GPU the exact search stays the default: its block products are what a GPU does fastest.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from clipguard.detection.knn import knn, similarity_to_distance
from clipguard.errors import ConfigError
from clipguard.options import Options, require

METHODS = ("exact", "ivf")
LOW_RECALL = 0.98  # below this share of true neighbours found, the scan warns
log = logging.getLogger("clipguard")


@dataclass
class NeighbourSearch(Options):
    """Settings of the neighbour search every density detector of a scan shares."""

    kind: ClassVar[str] = "neighbour search"
    method: Literal["exact", "ivf"] = "exact"
    chunk: int = 4096               # exact: query rows per block product
    nlist: int | None = None        # ivf: k-means cells (None: 4 sqrt(N), at most N / 39)
    # ivf: cells each query searches (None: 32, or a 64th of the cells when that is more). Chosen
    # for recall@64 >= 0.99: 32 of 988 cells on 60,000 real embeddings (16 gave 0.986-0.991), 63
    # of 4,000 on a million synthetic ones (32 gave 0.95); docs/scan.md
    nprobe: int | None = None
    recall_sample: int = 1000       # ivf: queries checked against the exact search (0: none)
    seed: int = 0                   # ivf: the k-means initialisation and the recall sample

    def validate(self) -> None:
        require(self.chunk >= 1, f"chunk must be >= 1, got {self.chunk}")
        require(self.nlist is None or self.nlist >= 1, f"nlist must be >= 1, got {self.nlist}")
        require(self.nprobe is None or self.nprobe >= 1, f"nprobe must be >= 1, got {self.nprobe}")
        require(self.recall_sample >= 0, f"recall_sample must be >= 0, got {self.recall_sample}")

    def cells(self, n: int) -> int:
        """The number of k-means cells for ``n`` points (faiss wants at least 39 points a cell)."""
        want = self.nlist if self.nlist is not None else round(4 * math.sqrt(n))
        return max(1, min(want, n // 39))

    def probes(self, nlist: int) -> int:
        """Cells each query searches, of ``nlist``."""
        want = self.nprobe if self.nprobe is not None else max(32, math.ceil(nlist / 64))
        return min(want, nlist)

    def find(self, x: torch.Tensor, k: int, metric: str, device: str | torch.device = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Distances and indices (N, k) of each row's k nearest other rows of ``x`` (unit rows for
        "cosine" and "l2"; "euclidean" measures the rows as they are), nearest first, and what
        the search was (method, cells, recall on the sample) for scan.json."""
        if self.method == "exact" or metric == "euclidean" or len(x) < 2 * 39:
            d, i = knn(x, x, k, metric=metric, exclude_self=True, chunk=self.chunk, device=device,
                       normalize=False)
            return d, i, {"method": "exact"}
        return self._ivf(x, k, metric)

    def _ivf(self, x: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        faiss = import_faiss()
        xs = np.ascontiguousarray(x.detach().float().cpu().numpy())
        n, dim = xs.shape
        nlist = self.cells(n)
        t0 = time.perf_counter()
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.cp.max_points_per_centroid = 64  # k-means on a sample: at a million pairs 25 s, not 84, same recall
        index.train(xs)
        index.add(xs)
        index.nprobe = self.probes(nlist)
        sims, idx = index.search(xs, k + 1)
        sims_t, idx_t = _drop_self(torch.from_numpy(sims), torch.from_numpy(idx), k)
        info = {"method": "ivf", "nlist": nlist, "nprobe": index.nprobe,
                "seconds": round(time.perf_counter() - t0, 3)}
        missing = int((idx_t < 0).sum())
        if missing:  # fewer than k points in the probed cells: a search too narrow for this k
            raise ConfigError(f"neighbour search: {missing} neighbours not found with nprobe {index.nprobe} of "
                              f"{nlist} cells for k = {k}; raise nprobe or lower nlist")
        if self.recall_sample:
            info["recall_at_k"] = round(self._recall(x, idx_t, k), 4)
            info["recall_sample"] = min(self.recall_sample, n)
            if info["recall_at_k"] < LOW_RECALL:
                log.warning("approximate neighbour search: %.1f%% of the true %d nearest neighbours found "
                            "(%d queries checked); raise --nprobe (now %d of %d cells) or use the exact search",
                            100 * info["recall_at_k"], k, info["recall_sample"], index.nprobe, nlist)
        return similarity_to_distance(sims_t, metric), idx_t, info

    def _recall(self, x: torch.Tensor, found: torch.Tensor, k: int) -> float:
        """The share of the exact k nearest neighbours the approximate search found, over a
        random sample of queries (ties at the k-th distance make this a slight underestimate)."""
        g = torch.Generator().manual_seed(self.seed)
        q = torch.randperm(len(x), generator=g)[: self.recall_sample].sort().values
        sims, near = knn(x[q], x, k + 1, metric="cosine", chunk=self.chunk, normalize=False)  # in blocks
        _, true = _drop_self(sims, near, k, rows=q)
        hit = (true.unsqueeze(2) == found[q].unsqueeze(1)).any(dim=2)
        return float(hit.float().mean())


def _drop_self(sims: torch.Tensor, idx: torch.Tensor, k: int, rows: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """k of the k + 1 results per row without the row itself (its own best match; where an exact
    copy came first, the row is still removed, wherever it is, and otherwise the last goes).
    ``rows``: each result row's own index (default: its position)."""
    rows = (torch.arange(len(idx)) if rows is None else rows).unsqueeze(1)
    is_self = idx == rows
    drop = torch.where(is_self.any(dim=1), is_self.int().argmax(dim=1), torch.full((len(idx),), k))
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[torch.arange(len(idx)), drop] = False
    return sims[keep].view(len(idx), k), idx[keep].view(len(idx), k).long()


def import_faiss():
    """faiss, or a clear error saying how to get it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("--neighbour-search ivf needs faiss: pip install 'clipguard[ann]' "
                          "(or pip install faiss-cpu)") from None
    return faiss
