"""AdamW with open_clip's parameter groups: no weight decay on norms, biases, embeddings' scalars."""

from __future__ import annotations

import torch


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, other = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (other if no_decay(n, p) else decay).append(p)
    return [{"params": other, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.2,
                   betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    # The fused kernel is 5x faster than foreach on the CPU (the 3.2M-entry token embedding
    # dominates a tiny model's step); it needs every parameter on one CPU/CUDA device type.
    devices = {p.device.type for p in model.parameters()}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's ``clip_grad_norm_``, bit for bit, without its multiply by exactly 1 on the CPU.

    torch scales every gradient by min(1, max_norm / norm) even when the norm is within bounds; on
    the CPU the test costs no device sync, so the in-bounds steps (nearly all of them) skip that
    pass over every gradient. On an accelerator the multiply stays: the test would stall it.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if grads and grads[0].device.type == "cpu" and bool(max_norm / (total + 1e-6) >= 1.0):
        return total
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
