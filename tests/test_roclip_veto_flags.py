"""benchmarks/roclip_veto_flags.py: the veto's flags of a cell's latest checkpoint, per attack part."""

import json

import pytest
import torch
from _benchmarks import load_benchmark
from safetensors.torch import save_file


def test_flags_are_counted_per_part_from_the_latest_checkpoint_that_holds_them(tmp_path):
    mod = load_benchmark("roclip_veto_flags")
    run = tmp_path / "runs" / "ds" / "four" / "seed3" / "pretrain-RoCLIP" / "checkpoints"
    early = torch.zeros(10, dtype=torch.uint8)
    late = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.uint8)
    for epoch, tensors in ((2, {"patterned": early}), (4, {"patterned": late}), (5, {"kept": late})):
        (run / f"epoch_{epoch:03d}").mkdir(parents=True)
        save_file(tensors, str(run / f"epoch_{epoch:03d}" / "strategy.safetensors"))
    poison = tmp_path / "poison" / "ds" / "four" / "seed3"
    for name, rows in (("part0-badnet-x", [0, 1, 2]), ("part1-sig-y", [3, 4])):
        (poison / name).mkdir(parents=True)
        (poison / name / "manifest.json").write_text(json.dumps({"poisoned_rows": rows}))
    counts = mod.veto_flags(tmp_path, "ds/four/RoCLIP/seed3")
    assert counts == {"part0-badnet-x": (2, 3), "part1-sig-y": (1, 2), "clean": (1, 5)}
    with pytest.raises(SystemExit, match="DATASET/ATTACK/ENTRY/seedS"):
        mod.veto_flags(tmp_path, "ds/four")
    with pytest.raises(SystemExit, match="no checkpoint"):
        mod.veto_flags(tmp_path, "ds/four/SafeCLIP/seed3")
