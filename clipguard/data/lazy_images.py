"""Images decoded on demand, for datasets too large to hold as one uint8 tensor.

Indexing with a batch of indices decodes those files in a thread pool (PIL releases the GIL while
decoding), so ``data.images[idx]`` means the same thing for in-memory and lazy data and the
trainer, evaluation and defences need no second code path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


class LazyImages:
    """uint8 (N, 3, S, S) images of files under ``root``, decoded when indexed.

    A file that fails to decode raises a ``DataError`` naming the CSV, row and field; it is not
    skipped, since the trainer's dataset cannot shrink mid-epoch. ``load_csv(lazy=True)`` reads
    every header up front (where ``skip_bad_rows`` applies), so only damaged pixel data gets here.
    """

    dtype = torch.uint8

    def __init__(self, root: Path, paths: Sequence[str], rows: Sequence[int], image_size: int,
                 source: str = "", workers: int = 8, field: str = "filepath"):
        self.root, self.paths, self.rows = Path(root), list(paths), list(rows)
        self.field = field
        self.image_size, self.source, self.workers = image_size, source, workers
        self._pool: ThreadPoolExecutor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def numel(self) -> int:
        n, c, h, w = self.shape
        return n * c * h * w

    def _decode(self, i: int) -> np.ndarray:
        from clipguard.data.csv_dataset import _decode_checked

        return _decode_checked(self.root / self.paths[i], self.image_size, self.source,
                               self.rows[i] if self.rows else None, self.field)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            return self.take(list(range(len(self)))[idx])
        if isinstance(idx, int):
            return torch.from_numpy(self._decode(idx))
        return self.take(idx)

    def take(self, idx, pin_memory: bool = False) -> torch.Tensor:
        """The images at ``idx`` (indices, a tensor of them), decoded in the thread pool straight into
        one uint8 batch; ``pin_memory`` (needs CUDA) allocates that batch in pinned host memory, so
        the trainer's copy to the GPU is asynchronous and no second host copy is made."""
        ids = torch.as_tensor(idx).reshape(-1).tolist() if not isinstance(idx, list) else idx
        s = self.image_size
        out = torch.empty((len(ids), 3, s, s), dtype=torch.uint8, pin_memory=pin_memory)
        if not ids:
            return out
        buf = out.numpy()

        def fill(k: int) -> None:
            buf[k] = self._decode(ids[k])

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers)
        for _ in self._pool.map(fill, range(len(ids))):
            pass
        return out

    def set_workers(self, workers: int) -> None:
        """Decode with ``workers`` threads from now on (the trainer's ``workers`` setting)."""
        if workers != self.workers:
            self.workers = workers
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=False)

    def select(self, ids: Sequence[int]) -> "LazyImages":
        return type(self)(self.root, [self.paths[i] for i in ids],
                          [self.rows[i] for i in ids] if self.rows else [], self.image_size,
                          self.source, self.workers, self.field)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        return state
