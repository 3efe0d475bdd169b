"""Captions for the pairs a detector drops, borrowed from the kept pairs around their images.

Dropping suspicious pairs throws away clean images too (a keep rule of 70% drops about six clean
pairs for every poison at 5% poisoned), and plain CLIP trained on what is left loses accuracy
with the data. A dropped image can instead be trained with a
caption of what it shows, taken from the kept pairs whose images it is nearest to. A poisoned
image then meets a caption of its own content instead of the attacker's target, so its trigger
is tied to nothing; a clean image gets back a caption like its own.

Among the ``k`` kept pairs with the nearest images, the caption given is the one nearest the mean
of their ``k`` caption embeddings (the neighbourhood's medoid): a few poisons the rule kept
cannot pass their caption on unless they are most of the neighbourhood.

Measured (docs/scan.md), it only helps where the scoring model's image neighbourhoods are right
about the dropped images: after a caption-agreement screen, which drops exactly the pairs whose
caption disagrees with the captions around the image, half of the borrowed captions named
another class, and accuracy fell by four points.
"""

from __future__ import annotations

import numpy as np
import torch

from clipguard.detection.knn import knn


@torch.no_grad()
def borrowed_captions(image: torch.Tensor, text: torch.Tensor, keep: np.ndarray, k: int = 16, *,
                      chunk: int = 4096, device: str | torch.device | None = None) -> np.ndarray:
    """For every dropped pair (``keep`` False), in row order, the row of the kept pair whose
    caption it borrows. ``image`` and ``text``: (N, D) L2-normalised embeddings of all N pairs."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (image.shape[0],) or text.shape[0] != image.shape[0]:
        raise ValueError(f"keep must be one flag per pair ({image.shape[0]}), got shape {keep.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kept_rows = np.flatnonzero(keep)
    dropped = np.flatnonzero(~keep)
    if len(dropped) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(kept_rows) == 0:
        raise ValueError("no pair is kept: there is no caption to borrow")
    # one neighbour search (knn blocks the query itself); the captions are gathered in chunks so
    # memory stays at chunk x k x D
    _, idx = knn(image[torch.from_numpy(dropped)], image[torch.from_numpy(kept_rows)], min(k, len(kept_rows)),
                 chunk=chunk, device=device)
    idx = idx.cpu()
    kept_txt = torch.nn.functional.normalize(text[torch.from_numpy(kept_rows)].float(), dim=1).cpu()
    best = torch.empty(len(dropped), dtype=torch.long)
    for s in range(0, len(dropped), chunk):
        caps = kept_txt[idx[s:s + chunk]]                                 # (b, k, D)
        centre = torch.nn.functional.normalize(caps.mean(dim=1), dim=1)  # (b, D)
        medoid = torch.einsum("bkd,bd->bk", caps, centre).argmax(dim=1, keepdim=True)
        best[s:s + chunk] = idx[s:s + chunk].gather(1, medoid).squeeze(1)
    return kept_rows[best.numpy()]
