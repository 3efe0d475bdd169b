"""A process that joined a process group leaves it at exit, before the interpreter tears down."""

import atexit
import sys

import torch.distributed as dist

from clipguard.training import distributed


def test_joining_a_group_registers_its_destruction_at_exit(monkeypatch, tmp_path):
    registered = []
    real_init = dist.init_process_group

    def one_rank_group(backend: str) -> None:  # torchrun's two ranks, played by one process
        real_init(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)

    monkeypatch.setattr(dist, "init_process_group", one_rank_group)
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delattr(sys, "last_value", raising=False)  # pytest leaves one after a failed test
    try:
        info = distributed.init_distributed("cpu")
        assert info.enabled and dist.is_initialized()
        assert len(registered) == 1
        with monkeypatch.context() as m:  # dying of an unhandled error: the group is left as it is
            m.setattr(sys, "last_value", RuntimeError("boom"), raising=False)
            registered[0]()
            assert dist.is_initialized()
        registered[0]()  # what the interpreter runs at a normal exit
        assert not dist.is_initialized()
        registered[0]()  # a group already left (e.g. by bench's cleanup) is not an error
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
