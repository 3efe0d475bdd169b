"""Image-to-text and text-to-image retrieval recall@k on paired data."""

from __future__ import annotations

import torch


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Pair i is (image i, caption i); a query hits if its partner is in the top k."""
    sim = image_features @ text_features.t()
    n = sim.shape[0]
    target = torch.arange(n).view(-1, 1)
    out = {}
    for k in ks:
        kk = min(k, n)
        out[f"image_retrieval_recall@{k}"] = float((sim.t().topk(kk, 1).indices == target).any(1).float().mean())
        out[f"text_retrieval_recall@{k}"] = float((sim.topk(kk, 1).indices == target).any(1).float().mean())
    return out
