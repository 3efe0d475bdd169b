"""benchmarks/finetune_drift.py on a tiny bench grid (one pre-training cell, two fine-tuning
methods, two seeds, split: val): a row per method with its drift, zero-shot and ASR, the JSON per
cell, the --data rows instead of the grid's, and a test-split grid without --data refused."""

import json
import re

import pytest
import yaml
from _benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench(fm_dir, tmp_path):
    from clipguard.bench.config import load_config
    from clipguard.bench.runner import run_bench

    grid = {"name": "tiny", "seeds": [0, 1], "split": "val",
            "datasets": {"fm": {"train": str(fm_dir / "train.csv"), "test": str(fm_dir / "test.csv"),
                                "probe_size": 64, "finetune_size": 128, "val_size": 64}},
            "attacks": {"badnet": {"attack": "badnet", "target": "bag", "rate": 0.05}},
            "pretrain": {"train": {"epochs": 1, "batch_size": 32, "warmup": 2}, "defenses": {"CLIP": "none"}},
            "finetune": {"train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup": 1},
                         "defenses": {"FT": "ft", "CleanCLIP": "cleanclip"}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    out = tmp_path / "bench"
    run_bench(load_config(tmp_path / "grid.yaml"), out, quiet=True, report=False)
    return out


def test_finetune_drift_prints_a_row_per_method(fm_dir, tmp_path, capsys):
    out = _bench(fm_dir, tmp_path)
    mod = load_benchmark("finetune_drift")
    mod.main([str(out), "--asr", "--json", str(tmp_path / "drift.json")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "n", "drift", "zero-shot", "vs", "start", "ASR@1"]
    rows = json.loads((tmp_path / "drift.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in rows) == [("CLIP+CleanCLIP", 0), ("CLIP+CleanCLIP", 1),
                                                              ("CLIP+FT", 0), ("CLIP+FT", 1)]
    assert all(0 < r["drift"] <= 4 and r["start_zeroshot"] >= 0 and "badnet" in r["asr"] for r in rows)
    assert sorted(line.split()[0] for line in lines[1:]) == ["CLIP+CleanCLIP", "CLIP+FT"]
    for line in lines[1:]:  # n, drift mean ± std, zero-shot mean ± std, change against the start, ASR
        assert re.fullmatch(r"CLIP\+\S+ +2 +\d\.\d{3} ± \d\.\d{3} +\d+\.\d ± \d+\.\d +[+-]\d+\.\d  badnet \d+\.\d", line), line

    mod.main([str(out), "--data", str(fm_dir / "test.csv"), "--limit", "50"])
    lines = capsys.readouterr().out.splitlines()
    assert "ASR@1" not in lines[0] and len(lines) == 3 and "badnet" not in lines[1]

    other = tmp_path / "test-split"
    (other / "cells").mkdir(parents=True)
    cell = json.loads((out / "cells" / "fm__badnet__CLIP+FT__seed0.json").read_text())
    (other / "cells" / "ft.json").write_text(json.dumps({**cell, "split": "test"}))
    with pytest.raises(SystemExit, match="pass --data"):
        mod.main([str(other)])
