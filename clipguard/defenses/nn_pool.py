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

from clipguard.training.distributed import DistInfo
from clipguard.training.losses import info_nce


class NNPool(torch.nn.Module):
    """FIFO queue of L2-normalised vectors. ``nearest`` is cosine = L2 nearest on the sphere.

    A module with registered buffers (as lightly's memory bank): ``.to(device)`` moves it,
    ``state_dict()`` saves it, and ``load_state_dict`` checks the shapes.
    """

    bank: torch.Tensor
    payload: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int, payload_shape: tuple[int, ...] | None = None,
                 payload_dtype: torch.dtype = torch.long):
        super().__init__()
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size, self.dim = int(size), int(dim)
        self.has_payload = payload_shape is not None
        self.register_buffer("bank", torch.zeros(self.size, self.dim))
        self.register_buffer("payload", torch.zeros((self.size, *payload_shape), dtype=payload_dtype)
                             if payload_shape is not None else torch.zeros(0, dtype=payload_dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))     # next slot: the oldest once full
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # number of valid entries

    def __len__(self) -> int:
        return int(self.filled)

    def entries(self) -> torch.Tensor:
        """Valid entries, oldest first."""
        n, p = int(self.filled), int(self.ptr)
        if n < self.size:
            return self.bank[:n]
        return torch.cat([self.bank[p:], self.bank[:p]])

    @torch.no_grad()
    def push(self, z: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        """Append rows of ``z`` (detached), dropping the oldest."""
        if (payload is None) == self.has_payload:
            raise ValueError("payload must be given exactly when the pool was built with one")
        z = z.detach().to(self.bank.device, self.bank.dtype)
        n = z.shape[0]
        if n >= self.size:  # only the newest `size` rows survive
            z = z[-self.size:]
            payload = payload[-self.size:] if payload is not None else None
            n = self.size
        idx = (int(self.ptr) + torch.arange(n, device=self.bank.device)) % self.size
        self.bank[idx] = z
        if payload is not None:
            self.payload[idx] = payload.to(self.payload.device, self.payload.dtype)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    @torch.no_grad()
    def _similarities(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine of each row of ``z`` with every valid entry, (rows, len); the pool must not be empty."""
        n = int(self.filled)
        if n == 0:
            raise RuntimeError("nearest neighbour asked of an empty pool")
        valid = self.bank[:n] if n < self.size else self.bank
        return z.detach().to(valid.device, valid.dtype) @ valid.t()

    @torch.no_grad()
    def nearest_index(self, z: torch.Tensor) -> torch.Tensor:
        """Index into ``bank`` of each row's nearest valid entry (pool must not be empty)."""
        return self._similarities(z).argmax(dim=1)

    @torch.no_grad()
    def nearest_k_index(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """(n, min(k, len)) indices into ``bank`` of each row's k nearest valid entries."""
        sims = self._similarities(z)
        return sims.topk(min(int(k), sims.shape[1]), dim=1).indices

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """NN(z, P) of Eq. 3 (a constant: no gradient flows into the pool).

        While the pool is still empty (the very first step) each row is its own neighbour,
        which reduces the loss to plain SimCLR for that step instead of using random vectors.
        """
        if int(self.filled) == 0:
            return z.detach().clone()
        return self.bank[self.nearest_index(z)].to(z.device, z.dtype)

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The buffers under ``prefix.``, for a strategy's safetensors file."""
        return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Restore from ``state_tensors`` output; a pool of another size is an error naming it."""
        mine = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not mine:
            return
        if "meta" in mine:  # checkpoints before the pool became a module: [ptr, filled] in one tensor
            ptr, filled = mine.pop("meta").tolist()
            mine.update(ptr=torch.tensor(ptr), filled=torch.tensor(filled))
            mine.setdefault("payload", self.payload)
        for k, v in mine.items():
            cur = getattr(self, k, None)
            if cur is None or tuple(v.shape) != tuple(cur.shape):
                raise ValueError(f"saved pool {prefix}.{k} is {tuple(v.shape)}, expected "
                                 f"{None if cur is None else tuple(cur.shape)}")
        self.load_state_dict(mine, strict=True)


def nn_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, pool: NNPool, mask: torch.Tensor,
                        temperature: float, dist: DistInfo | None = None) -> torch.Tensor:
    """SafeCLIP Eq. 2, symmetrised as in NNCLR: NN(z1, P) must pick z2 among the batch's second
    views, and NN(z2, P) must pick z1. The neighbours are constants, so the gradient reaches the
    encoder only through the views themselves, and only the tower that produced z1/z2."""
    a = info_nce(pool.nearest(z1), z2, temperature, dist, mask=mask)
    b = info_nce(pool.nearest(z2), z1, temperature, dist, mask=mask)
    return 0.5 * (a + b)


def nn_target_loss(z1: torch.Tensor, z2: torch.Tensor, pool: NNPool, mask: torch.Tensor,
                   temperature: float, dist: DistInfo | None = None) -> torch.Tensor:
    """Eq. 2 with the second view as a constant target: NN(z2, P) must pick z1 among the batch's
    first views. The gradient reaches only z1, so z2 can be encoded without a backward pass."""
    return info_nce(pool.nearest(z2.detach()), z1, temperature, dist, mask=mask)


def nn_self_loss(z: torch.Tensor, pool: NNPool, mask: torch.Tensor, temperature: float,
                 dist: DistInfo | None = None) -> torch.Tensor:
    """Eq. 2 on one view: NN(z, P) must pick z among the batch's views. The positive is another
    item's embedding near this one's, so the loss still pulls similar items together, without a
    second view to encode (SafeCLIP's ``risky_loss: one-view``)."""
    return info_nce(pool.nearest(z.detach()), z, temperature, dist, mask=mask)
