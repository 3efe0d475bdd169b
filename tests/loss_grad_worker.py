"""Gradients of clip_loss (plain, masked, with extra negatives) and info_nce under torchrun (gloo),
averaged over ranks as DDP does, written next to the loss value so a test can compare them with one
process on the whole batch."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from clipguard.training.distributed import DistInfo
from clipguard.training.losses import clip_loss, info_nce

out = sys.argv[1]
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
    info = DistInfo(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), device=torch.device("cpu"))
else:
    info = DistInfo()
g = torch.Generator().manual_seed(0)
img_all = torch.nn.functional.normalize(torch.randn(8, 5, generator=g), dim=1)
txt_all = torch.nn.functional.normalize(torch.randn(8, 5, generator=g), dim=1)
mask_all = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
rows = slice(info.rank * 8 // world, (info.rank + 1) * 8 // world)
res = {}
for name in ("clip", "clip_masked", "clip_negatives", "nce"):
    img = img_all[rows].clone().requires_grad_(True)
    txt = txt_all[rows].clone().requires_grad_(True)
    scale = torch.tensor(2.5, requires_grad=True)
    mask = mask_all[rows] if name in ("clip_masked", "clip_negatives") else None
    negatives = ~mask_all[rows] if name == "clip_negatives" else None
    loss = info_nce(img, txt, scale, info) if name == "nce" else clip_loss(img, txt, scale, info, mask=mask,
                                                                           negatives=negatives)
    loss.backward()
    gs = scale.grad.clone()
    gi = img.grad.clone()
    if world > 1:  # what DDP does with a replicated parameter's gradient: the mean over ranks
        dist.all_reduce(gs)
        gs /= world
        gi = gi / world  # DDP averages; the features' rows are disjoint, so gather them back
        parts = [torch.empty_like(gi) for _ in range(world)]
        dist.all_gather(parts, gi)
        gi = torch.cat(parts)
    res[f"{name}_loss"] = loss.detach().reshape(1)
    res[f"{name}_scale_grad"] = gs.reshape(1)
    res[f"{name}_img_grad"] = gi
if info.rank == 0:
    save_file(res, out)
if world > 1:
    dist.destroy_process_group()
