"""Contrastive losses as small composable functions (in the spirit of open_clip's loss.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard.training.distributed import DistInfo, all_gather_nograd, gather_with_local_grad

MAX_LOGIT_SCALE = 4.605170185988092  # ln(100)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              dist: DistInfo | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; ``mask`` keeps a subset of rows (e.g. safe pairs).

    Features are L2-normalised open_clip outputs. Under DDP the features of all ranks are
    gathered (gradient for the local slice only) and the loss is scaled by the world size, so
    the averaged gradient equals that of one process holding the whole batch.
    """
    dist = dist or DistInfo()
    if mask is None:
        mask = torch.ones(image_features.shape[0], dtype=torch.bool, device=image_features.device)
    img = gather_with_local_grad(image_features, dist)
    txt = gather_with_local_grad(text_features, dist)
    keep = all_gather_nograd(mask.to(torch.uint8), dist).bool()
    if int(keep.sum()) == 0:
        return image_features.sum() * 0.0 + text_features.sum() * 0.0
    img, txt = img[keep], txt[keep]
    logits = logit_scale * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    return loss * dist.world_size


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float | torch.Tensor,
             dist: DistInfo | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One-directional InfoNCE: row i of ``queries`` should match row i of ``keys``.

    The in-modal losses (an image and its view, a caption and its EDA view) and SafeCLIP's
    nearest-neighbour loss. Rows are gathered across ranks first (fixed shapes, gradient on the
    local slice), then ``mask`` keeps a subset, so every rank may hold a different number of
    valid rows; no valid row anywhere gives an exact zero that still touches both inputs (DDP
    needs the graph).
    """
    dist = dist or DistInfo()
    q = gather_with_local_grad(queries, dist)
    k = gather_with_local_grad(keys, dist)
    if mask is not None:
        keep = all_gather_nograd(mask.to(torch.uint8), dist).bool()
        if int(keep.sum()) == 0:
            return queries.sum() * 0.0 + keys.sum() * 0.0
        q, k = q[keep], k[keep]
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * dist.world_size
