"""benchmarks/finetune_interpolation.py: the path's end points are the two models, integer
buffers come from the end, and a midpoint is the mean."""

import torch
from _benchmarks import load_benchmark


def test_interpolated_weights():
    mod = load_benchmark("finetune_interpolation")
    start = {"w": torch.zeros(3), "n": torch.tensor(1)}
    end = {"w": torch.full((3,), 2.0), "n": torch.tensor(5)}
    assert torch.equal(mod._interpolated(start, end, 0.0)["w"], start["w"])
    assert torch.equal(mod._interpolated(start, end, 1.0)["w"], end["w"])
    mid = mod._interpolated(start, end, 0.5)
    assert torch.allclose(mid["w"], torch.ones(3))
    assert int(mid["n"]) == 5
