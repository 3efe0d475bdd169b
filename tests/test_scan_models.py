"""benchmarks/scan_models.py on a tiny bench grid (a two-part attack, two seeds): every detector's
AUROC on every part, scored by each of the three models, is printed and written; an attack the
grid has no plain-CLIP cell of is refused."""

import json
import re

import pytest
import yaml
from _benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def _grid(tmp_path):
    # the benchmark draws its trusted rows from the builtin Fashion-MNIST pool, so the grid uses it
    # (the rows fm_dir is made of) rather than a CSV
    grid = {"name": "tiny-scan", "model": "cg-nano", "device": "cpu", "seeds": [0, 1],
            "datasets": {"fm": {"builtin": "fashion-mnist", "train_size": 256, "test_size": 100, "data_seed": 0,
                                "probe_size": 0, "finetune_size": 0}},
            "attacks": {"two": {"parts": [{"attack": "badnet", "target": "sneaker", "count": 16},
                                          {"attack": "blended", "target": "bag", "count": 16,
                                           "options": {"alpha": 0.2}}]}},
            "pretrain": {"train": {"epochs": 1, "batch_size": 32, "warmup": 2}, "defenses": {"CLIP": "none"}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_scan_models_prints_every_detector_for_every_model(tmp_path, capsys):
    from clipguard.bench.config import load_config
    from clipguard.bench.runner import run_bench

    config, out, work = _grid(tmp_path), tmp_path / "bench", tmp_path / "work"
    run_bench(load_config(config), out, quiet=True, report=False)  # the grid's poisoned CLIP models
    mod = load_benchmark("scan_models")
    mod.main([str(config), "--out", str(out), "--attack", "two", "--work", str(work), "--trusted-size", "128",
              "--trusted-epochs", "1", "--warmup-epochs", "1", "--json", str(tmp_path / "scan.json")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines[0] == "AUROC (%) per attack part, mean ± std over seeds [0, 1]; two of tiny-scan"
    labels = ["similarity", "caption-agreement (k=16)", "caption-agreement", "repeat", "kdist",
              "kdist (space=joint)", "lid", "dao", "iforest"]
    models = ("poisoned", "trusted", "warm-up")
    assert len(lines) == 1 + len(models) * (1 + len(labels))
    for i, model in enumerate(models):
        block = lines[1 + i * (1 + len(labels)):1 + (i + 1) * (1 + len(labels))]
        assert block[0] == f"scored by the {model} model"
        for label, line in zip(labels, block[1:]):
            assert re.fullmatch(rf"  {re.escape(label)} +badnet +\d+\.\d ± +\d+\.\d   blended +\d+\.\d ± +\d+\.\d",
                                line), (model, line)
    res = json.loads((tmp_path / "scan.json").read_text())
    assert (res["seeds"], res["trusted_size"], res["warmup_epochs"]) == ([0, 1], 128, 1)
    assert list(res["auroc"]) == list(models) and list(res["mean"]["trusted"]) == labels
    for model in ("trusted", "warm-up"):  # both seeds; each part against the clean pairs
        for cols in res["auroc"][model].values():
            assert [c.split(":")[-1] for c in cols] == ["badnet", "blended"]
            assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in cols.values())
    assert (work / "trusted128" / "checkpoints").is_dir()

    with pytest.raises(SystemExit, match="no plain-CLIP pre-training cell of attack 'three'"):
        mod.main([str(config), "--out", str(out), "--attack", "three", "--work", str(work)])


def test_one_seed_prints_no_spread():
    mod = load_benchmark("scan_models")
    assert mod.auroc_cell([0.9]) == " 90.0"
    assert mod.auroc_cell([0.9, 0.8]) == " 85.0 ±  7.1"
