"""benchmarks/gpu_check.py on the CPU (cg-nano, a few steps): every row runs and the JSON has its keys.

The GPU figures come from running the same script on a GPU (docs/scale.md, "Checking a GPU")."""

import json

import pytest
from _benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_check_runs_on_the_cpu_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    load_benchmark("gpu_check").main(["--model", "cg-nano", "--device", "cpu", "--steps", "2", "--warmup-steps", "1",
                  "--batch-size", "16", "--workers", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] is True
    for key in ("date", "device", "gpu", "torch", "open_clip", "clipguard", "settings", "rows", "argv",
                "open_clip_images_per_s", "wall_s"):
        assert key in res, key
    assert res["device"] == "cpu" and res["gpu"] is None
    s = res["settings"]
    assert (s["model"], s["batch_size"], s["steps"], s["warmup_steps"], s["precision"]) == ("cg-nano", 16, 2, 1, "bf16")
    runs = [r["run"] for r in res["rows"]]
    assert runs == ["open_clip minimal loop", "clipguard none (clip)", "clipguard safeclip (unimodal)",
                    "clipguard safeclip (mixed)", "clipguard roclip (pool)", "clipguard cleanclip (standard)",
                    "clipguard par (standard)", "clipguard none (lazy JPEG, 2 workers)",
                    "open_clip minimal loop (again)"]
    for r in res["rows"]:
        assert "error" not in r and "skipped" not in r, r
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["vs_open_clip"] > 0
        assert r["peak_gib"] is None and r["precision"] == "bf16"
    lazy = res["rows"][-2]
    assert lazy["lazy"] and lazy["images_on_device"] is False and lazy["jpeg_write_s"] > 0
    phases = {r["run"]: r.get("trainer_phase") for r in res["rows"] if r["kind"] == "clipguard"}
    assert phases["clipguard safeclip (unimodal)"] == "unimodal" and phases["clipguard safeclip (mixed)"] == "mixed"
    printed = capsys.readouterr().out
    assert "images/s" in printed and "clipguard safeclip (mixed)" in printed


def test_gpu_check_times_the_padded_text_beside_the_trimmed(tmp_path):
    out = tmp_path / "trim.json"
    load_benchmark("gpu_check").main(["--model", "cg-nano", "--device", "cpu", "--steps", "2", "--warmup-steps", "1",
                  "--batch-size", "16", "--defenses", "none", "--no-lazy", "--trim-text", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["settings"]["trim_text"] is True
    assert [r["run"] for r in res["rows"]] == ["open_clip minimal loop", "clipguard none (clip)",
                                              "clipguard none (clip, padded text)", "open_clip minimal loop (again)"]
    assert all(r["images_per_s"] > 0 for r in res["rows"])


def test_gpu_check_refuses_unknown_defences_and_cpu_fp16(tmp_path):
    from clipguard.errors import ConfigError

    mod = load_benchmark("gpu_check")
    with pytest.raises(ConfigError, match="unknown defense .safeclp."):
        mod.main(["--model", "cg-nano", "--device", "cpu", "--defenses", "safeclp", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        mod.main(["--model", "cg-nano", "--device", "cpu", "--precision", "amp", "--out", str(tmp_path / "y.json")])
