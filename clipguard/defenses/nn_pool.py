"""A FIFO memory bank of embeddings with nearest-neighbour look-up (NNCLR-style support set).

SafeCLIP (Eq. 2-3) replaces an embedding's positive by its nearest neighbour in a pool of
recent embeddings, so poisoned images (identical TDPA targets, patched BadNet images) do not
collapse onto each other. RoCLIP keeps a pool of caption embeddings to re-pair every image.
The pool fills first and then overwrites its oldest entries; under DDP every rank pushes the
gathered batch so all ranks hold the same pool. Optionally it keeps a payload per entry (the
caption tokens RoCLIP re-encodes, so its text tower still gets gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard.training.distributed import DistInfo, all_gather_nograd, gather_with_local_grad


class NNPool:
    """FIFO queue of L2-normalised vectors. ``nearest`` is cosine = L2 nearest on the sphere."""

    def __init__(self, size: int, dim: int, payload_shape: tuple[int, ...] | None = None,
                 payload_dtype: torch.dtype = torch.long):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size, self.dim = int(size), int(dim)
        self.bank = torch.zeros(self.size, self.dim)
        self.payload = (torch.zeros((self.size, *payload_shape), dtype=payload_dtype)
                        if payload_shape is not None else None)
        self.ptr = 0       # next slot to overwrite (the oldest entry once full)
        self.filled = 0    # number of valid entries

    def __len__(self) -> int:
        return self.filled

    def entries(self) -> torch.Tensor:
        """Valid entries, oldest first."""
        if self.filled < self.size:
            return self.bank[: self.filled]
        return torch.cat([self.bank[self.ptr:], self.bank[: self.ptr]])

    @torch.no_grad()
    def push(self, z: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        """Append rows of ``z`` (detached, to CPU-side storage on z's device), dropping the oldest."""
        z = z.detach()
        if self.bank.device != z.device:
            self.bank = self.bank.to(z.device)
            if self.payload is not None:
                self.payload = self.payload.to(z.device)
        if (payload is None) != (self.payload is None):
            raise ValueError("payload must be given exactly when the pool was built with one")
        n = z.shape[0]
        if n >= self.size:  # only the newest `size` rows survive
            z = z[-self.size:]
            payload = payload[-self.size:] if payload is not None else None
            n = self.size
        idx = (self.ptr + torch.arange(n, device=z.device)) % self.size
        self.bank[idx] = z.to(self.bank.dtype)
        if payload is not None:
            self.payload[idx] = payload.to(self.payload.device, self.payload.dtype)
        self.ptr = int((self.ptr + n) % self.size)
        self.filled = min(self.size, self.filled + n)

    @torch.no_grad()
    def nearest_index(self, z: torch.Tensor) -> torch.Tensor:
        """Index into ``bank`` of each row's nearest valid entry (pool must not be empty)."""
        if self.filled == 0:
            raise RuntimeError("nearest neighbour asked of an empty pool")
        if self.bank.device != z.device:
            self.bank = self.bank.to(z.device)
            if self.payload is not None:
                self.payload = self.payload.to(z.device)
        valid = self.bank[: self.filled] if self.filled < self.size else self.bank
        sims = z.detach().to(valid.dtype) @ valid.t()
        return sims.argmax(dim=1)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """NN(z, P) of Eq. 3 (a constant: no gradient flows into the pool).

        While the pool is still empty (the very first step) each row is its own neighbour,
        which reduces the loss to plain SimCLR for that step instead of using random vectors.
        """
        if self.filled == 0:
            return z.detach().clone()
        return self.bank[self.nearest_index(z)].to(z.dtype)

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.bank": self.bank.cpu().contiguous(),
               f"{prefix}.meta": torch.tensor([self.ptr, self.filled], dtype=torch.long)}
        if self.payload is not None:
            out[f"{prefix}.payload"] = self.payload.cpu().contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        if f"{prefix}.bank" not in tensors:
            return
        bank = tensors[f"{prefix}.bank"]
        if tuple(bank.shape) != (self.size, self.dim):
            raise ValueError(f"saved pool {prefix} is {tuple(bank.shape)}, expected {(self.size, self.dim)}")
        self.bank = bank.clone().to(self.bank.device)
        if self.payload is not None and f"{prefix}.payload" in tensors:
            self.payload = tensors[f"{prefix}.payload"].clone().to(self.payload.device)
        self.ptr, self.filled = (int(v) for v in tensors[f"{prefix}.meta"].tolist())


def masked_info_nce(queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, temperature: float,
                    dist: DistInfo | None = None) -> torch.Tensor:
    """InfoNCE of row i of ``queries`` against row i of ``keys`` over the rows where ``mask`` holds.

    Rows are gathered across ranks first (fixed shapes, gradient on the local slice), then the
    mask selects, so every rank may hold a different number of valid rows. No valid row
    anywhere gives an exact zero that still touches both inputs (DDP needs the graph).
    """
    dist = dist or DistInfo()
    q = gather_with_local_grad(queries, dist)
    k = gather_with_local_grad(keys, dist)
    keep = all_gather_nograd(mask.to(torch.uint8), dist).bool()
    if int(keep.sum()) == 0:
        return queries.sum() * 0.0 + keys.sum() * 0.0
    q, k = q[keep], k[keep]
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * dist.world_size


def nn_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, pool: NNPool, mask: torch.Tensor,
                        temperature: float, dist: DistInfo | None = None) -> torch.Tensor:
    """SafeCLIP Eq. 2, symmetrised as in NNCLR: NN(z1, P) must pick z2 among the batch's second
    views, and NN(z2, P) must pick z1. The neighbours are constants, so the gradient reaches the
    encoder only through the views themselves, and only the tower that produced z1/z2."""
    a = masked_info_nce(pool.nearest(z1), z2, mask, temperature, dist)
    b = masked_info_nce(pool.nearest(z2), z1, mask, temperature, dist)
    return 0.5 * (a + b)
