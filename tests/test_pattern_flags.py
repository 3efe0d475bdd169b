"""benchmarks/pattern_flags.py at a tiny size: the pattern veto's flags at several cuts of a
finished SafeCLIP bench cell, with the poisons among them."""

from __future__ import annotations

import pytest
import yaml
from _benchmarks import load_benchmark

from clipguard.bench.config import load_config
from clipguard.bench.runner import run_bench
from clipguard.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_flag_counts_of_a_finished_cell(fm_dir, tmp_path, capsys):
    opts = dict(warmup_epochs=0, clip_warmup_epochs=1, lr_low_factor=1.0, min_initial_fraction=0.3,
                step=0.2, pool_size=128, density_z=None, repeat_z=None, pattern_z=2.0, pattern_clusters=4)
    grid = {"name": "tiny", "seeds": [0],
            "datasets": {"fm": {"train": str(fm_dir / "train.csv"), "test": str(fm_dir / "test.csv"),
                                "probe_size": 0, "finetune_size": 0}},
            "attacks": {"badnet": {"attack": "badnet", "target": "bag", "rate": 0.05}},
            "pretrain": {"train": {"epochs": 3, "batch_size": 64, "warmup": 2},
                         "defenses": {"CLIP": "none", "Pat": {"defense": "safeclip", "options": opts}}}}
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    out = tmp_path / "bench"
    run_bench(load_config(config), out, quiet=True, report=False)
    mod = load_benchmark("pattern_flags")
    rows = mod.flag_counts(config, out, "fm/badnet/Pat/seed0", (2.0, 4.0, 1e6))
    assert [r["cut"] for r in rows] == [2.0, 4.0, 1e6]
    assert rows[0]["flagged"] >= rows[1]["flagged"] >= rows[2]["flagged"] == 0
    assert all(r["clean"] <= r["flagged"] for r in rows)
    found, total = (int(x) for x in rows[0]["badnet"].split("/"))
    assert total > 0 and rows[0]["flagged"] - rows[0]["clean"] == found
    tail = mod.flag_counts(config, out, "fm/badnet/Pat/seed0", (2.0, 4.0, 1e6), tail=1.0)
    assert tail[0]["cut"] is None and [r["cut"] for r in tail[1:]] == [2.0, 4.0, 1e6]
    assert all(t["flagged"] <= min(r["flagged"], tail[0]["flagged"]) for t, r in zip(tail[1:], rows))
    mod.main([str(config), str(out), "fm/badnet/Pat/seed0", "--cuts", "2"])
    assert capsys.readouterr().out.startswith("z > 2:")
    with pytest.raises(ConfigError, match="not a SafeCLIP cell with the pattern veto"):
        mod.flag_counts(config, out, "fm/badnet/CLIP/seed0")
