"""The process group: left at exit before the interpreter tears down; DDP searches for unused
parameters wherever a step can leave one out."""

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
    monkeypatch.setattr(atexit, "register", lambda fn, *args: registered.append(lambda: fn(*args)))
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


def test_ddp_skips_the_unused_parameter_search_only_where_every_parameter_trains():
    import torch

    from clipguard import defenses
    from clipguard.models.factory import create_model
    from clipguard.training.strategy import ClipStrategy
    from clipguard.training.trainer import every_parameter_trains

    model = create_model("cg-tiny")
    assert every_parameter_trains(model, ClipStrategy())
    assert not every_parameter_trains(model, defenses.build("safeclip"))  # an all-risky batch skips the scale
    model.logit_bias = torch.nn.Parameter(torch.zeros(1))  # a SigLIP model's bias: no gradient from the CLIP loss
    assert not every_parameter_trains(model, ClipStrategy())
