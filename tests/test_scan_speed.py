"""benchmarks/scan_speed.py at 500 pairs: the scan runs end to end and the JSON has its keys.

The 60,000-pair figure comes from running the same script at full size (docs/scan.md, "Speed")."""

import json

import pytest
from _benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scan_speed_runs_small_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "scan_speed.json"
    load_benchmark("scan_speed").main(["--pairs", "500", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "total (end to end)" in printed and "random init" in printed
    res = json.loads(out.read_text())
    for key in ("date", "cpu", "threads", "device", "torch", "clipguard", "argv", "model", "weights", "pairs",
                "poisoned", "detectors", "phases", "total_seconds", "pairs_per_s", "target_seconds",
                "within_target", "auroc"):
        assert key in res, key
    assert (res["pairs"], res["poisoned"], res["model"]) == (500, 5, "cg-tiny")
    assert res["detectors"] == ["caption-agreement", "dao", "ensemble", "iforest", "kdist", "lid", "mixture", "repeat", "similarity", "slof",
                                "spectral"]
    phases = res["phases"]
    assert {"load (model + data)", "encode", "neighbour search (image, l2)", "write outputs"} <= phases.keys()
    assert all(f"detector {d}" in phases for d in res["detectors"])
    assert all(s >= 0 for s in phases.values())
    assert sum(phases.values()) == pytest.approx(res["total_seconds"], rel=1e-6)
    assert res["pairs_per_s"] > 0 and (tmp_path / "work" / "scan" / "scan.json").is_file()


def test_knn_speed_runs_small_and_measures_recall(tmp_path, capsys):
    pytest.importorskip("faiss")
    out = tmp_path / "knn.json"
    res = load_benchmark("knn_speed").main(["--pairs", "5000", "--k", "8", "--exact-queries", "500",
                                            "--scan", "--out", str(out)])
    assert "faster" in capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert (res["pairs"], res["nlist"], res["nprobe"], res["recall_queries"]) == (5000, 128, 32, 500)  # 4 sqrt(N) = 283, N / 39
    assert 0.9 < res["recall_at_k"] <= 1.0 and res["ivf_seconds"] > 0 and res["exact_seconds_estimated"] > 0
    scan = res["scan"]  # every default detector on the synthetic pairs, with the approximate search
    assert set(scan["detectors"]) >= {"caption-agreement", "dao", "spectral"} and scan["peak_memory_mb"] > 0
    assert scan["searches"]["image/l2"]["method"] == "ivf" and scan["searches"]["image/l2"]["recall_at_k"] > 0.9
