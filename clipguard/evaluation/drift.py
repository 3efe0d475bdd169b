"""How far fine-tuning moved a model: a measure the defender can take without knowing any trigger.

The mean squared distance between the L2-normalised image embeddings of the same clean images
under two models (start and end). On unit vectors ``||a - b||^2 = 2 - 2 cos(a, b)``: 0 is "did
not move", 2 is "orthogonal on average". PAR's push term is the same quantity on training views.
It chose the small models' fine-tuning recipe (docs/finetuning.md#settings) and ``--lr-search``.
"""

from __future__ import annotations

import torch

from clipguard.evaluation.features import encode_images


@torch.no_grad()
def embedding_drift(start: torch.Tensor | torch.nn.Module, end: torch.nn.Module, images,
                    device: torch.device | str = "cpu") -> float:
    """Mean ``||f_end(x) - f_start(x)||^2`` over ``images`` (uint8 tensor or LazyImages).

    ``start`` is a model or its already computed features of the same images (to encode them
    once for several end models)."""
    f0 = start if isinstance(start, torch.Tensor) else encode_images(start, images, device)
    f1 = encode_images(end, images, device)
    if f0.shape != f1.shape:
        raise ValueError(f"start features {tuple(f0.shape)} and end features {tuple(f1.shape)} differ")
    return float((f1 - f0).pow(2).sum(1).mean()) if len(f1) else float("nan")
