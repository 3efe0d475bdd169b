"""DDP plumbing: the same code runs alone, under ``torchrun`` with gloo on the CPU, or NCCL on GPUs."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from clipguard.models.device import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:  # 'cuda' or 'auto' with a GPU: this rank's GPU
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    info = DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_leave_at_exit, info)
    return info


def _leave_at_exit(info: DistInfo) -> None:
    """Leave the process group while the interpreter is still whole. A process that exits with
    the group alive can abort at finalisation ("terminate called without an active exception":
    gloo's worker threads outlive the objects they hold), and torchrun then fails the whole run
    after it has finished; training, the CLI and scripts on the Python API all go through here.
    A process dying of an unhandled error leaves the group as it is: the other ranks may be waiting
    in a collective, leaving could block until they time out, and torchrun ends them anyway."""
    if getattr(sys, "last_value", None) is None:
        cleanup(info)


def gather_with_local_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All-gather along dim 0; gradient flows only into this rank's slice.

    With the full loss computed on every rank and scaled by the world size, DDP's gradient
    averaging then gives exactly the single-process gradient of the global batch.
    """
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts, dim=0)


def all_gather_nograd(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x)
    return x


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Make a decision once (e.g. SafeCLIP's split) and hand every rank the same answer."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_zero_first(make: Callable[[], Any], read: Callable[[], Any]) -> Any:
    """Under torchrun, rank 0 makes a decision that is written to disk (a detection, a screen) and
    the other ranks read it after a barrier, so every rank trains on the same pairs; in one
    process, ``make()``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rec = make() if dist.get_rank() == 0 else None
        dist.barrier()
        return rec if rec is not None else read()
    return make()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
