"""Screen, then retrain (``clipguard train --retrain-keep``): the screening run, its scan and the
retrained run, their folders, and the run-folder safety rules across the three steps."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipguard.cli import main
from clipguard.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _latest(run):
    return sorted((run / "checkpoints").glob("epoch_*"))[-1]


def _args(fm_dir, out, *extra):
    return ["train", "--data", str(fm_dir / "train.csv"), "--out", str(out), "--model", "cg-nano",
            "--epochs", "1", "--batch-size", "64", "--limit", "200", "--device", "cpu", "--quiet",
            "--retrain-keep", "0.7", *extra]


def test_screen_then_retrain_drops_the_pairs_the_screening_model_finds_most_suspicious(fm_dir, tmp_path, capsys):
    import clipguard
    from clipguard.detection.base import build
    from clipguard.detection.runner import encode_pairs

    out = tmp_path / "run"
    assert main(_args(fm_dir, out)) == 0
    assert "retrained on 140 of 200 pairs" in capsys.readouterr().out
    rec = json.loads((out / "scan" / "screen.json").read_text())
    assert rec["n_pairs"] == 200 and rec["kept"] == 140 and len(rec["dropped_rows"]) == 60
    assert rec["settings"] == {"keep": 0.7, "detector": "caption-agreement", "options": {}}
    # the dropped rows are the 60 highest caption-agreement scores of the screening run's model
    net, tok = clipguard.load_model(out / "screen")
    data = clipguard.load_data(fm_dir / "train.csv", model="cg-nano", limit=200)
    scores = np.asarray(build("caption-agreement", {}).score(encode_pairs(net, tok, data, progress=False)))
    assert set(rec["dropped_rows"]) == set(np.argsort(-scores, kind="stable")[:60].tolist())
    # the scan is the one `clipguard scan` writes, its kept.csv the pairs retrained on
    with open(out / "scan" / "scores.csv") as f:
        kept_col = [int(r["kept"]) for r in csv.DictReader(f)]
    assert sum(kept_col) == 140 and [i for i, k in enumerate(kept_col) if not k] == sorted(rec["dropped_rows"])
    # OUT is plain CLIP trained from scratch on the kept pairs
    params = json.loads((out / "params.json").read_text())
    assert params["defense"] == "none" and params["steps_per_epoch"] == 140 // 64
    screen_w, final_w = load_file(str(_latest(out / "screen") / "model.safetensors")), \
        load_file(str(_latest(out) / "model.safetensors"))
    assert any(not torch.equal(screen_w[k], final_w[k]) for k in screen_w)
    assert clipguard.evaluate(out, fm_dir / "test.csv")["metrics"]["zeroshot"]["n_images"] == 200


def test_screen_then_retrain_never_redoes_a_finished_step_silently(fm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(fm_dir, out, "--defense", "safeclip", "--opt", "warmup_epochs=1", "--epochs", "3")) == 0
    capsys.readouterr()
    args = _args(fm_dir, out, "--defense", "safeclip", "--opt", "warmup_epochs=1", "--epochs", "3")
    stamp = {p: p.stat().st_mtime_ns for p in (_latest(out / "screen") / "model.safetensors",
                                                 _latest(out) / "model.safetensors", out / "scan" / "screen.json")}
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    # --resume latest on a finished pipeline trains nothing and scans nothing again
    assert main(args + ["--resume", "latest"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    assert "nothing left to train" in capsys.readouterr().out
    # a scan is reused only for the screening model that made it
    rec = json.loads((out / "scan" / "screen.json").read_text())
    (out / "scan" / "screen.json").write_text(json.dumps({**rec, "screen_weights_sha256": "another model"}))
    assert main(args + ["--resume", "latest"]) == 0
    assert json.loads((out / "scan" / "screen.json").read_text())["screen_weights_sha256"] == \
        rec["screen_weights_sha256"] != "another model"
    # an interrupted retraining resumes with exactly the pairs it started with
    before = json.loads((out / "scan" / "screen.json").read_text())["dropped_rows"]
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "scan" / "screen.json").read_text())["dropped_rows"] == before  # CPU: deterministic
    # a screening run left alone in OUT/screen also blocks a fresh start
    fresh = tmp_path / "fresh"
    (fresh / "screen").mkdir(parents=True)
    (fresh / "screen" / "params.json").write_text("{}")
    assert main(_args(fm_dir, fresh)) == 2 and "already holds a run" in capsys.readouterr().err


def test_a_screening_run_stopped_early_is_finished_before_anything_is_scanned(fm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(fm_dir, out, "--epochs", "2")
    assert main(args + ["--stop-after", "1"]) == 0
    assert "stopped before its last epoch" in capsys.readouterr().out
    assert (out / "screen" / "checkpoints").is_dir() and not (out / "scan").exists() and not (out / "checkpoints").exists()
    assert main(args + ["--resume", "latest"]) == 0
    assert "retrained on 140 of 200 pairs" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--retrain-keep", "1.0"], "--retrain-keep must be in (0, 1)"),
    (["--retrain-keep", "nan"], "--retrain-keep must be in (0, 1)"),
    (["--retrain-detector", "nope"], "'nope' is not a detector"),
    (["--retrain-veto", "nope"], "--retrain-veto 'nope' is not a detector"),
    (["--retrain-veto", "caption-agreement"], "is the screen's detector"),
])
def test_screen_settings_are_checked_before_any_work(fm_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(_args(fm_dir, out, *extra)) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_screen_detector_without_a_keep_share_is_refused():
    from clipguard.training.screen import ScreenOptions

    assert ScreenOptions.from_flags(None, None) is None
    with pytest.raises(ConfigError, match="needs --retrain-keep"):
        ScreenOptions.from_flags(None, "dao")
    assert ScreenOptions.from_flags(0.5, "dao").identity() == {"keep": 0.5, "detector": "dao", "options": {}}
    with pytest.raises(ConfigError, match="--retrain-veto needs --retrain-keep"):
        ScreenOptions.from_flags(None, None, ["repeat"])
    assert ScreenOptions.from_flags(0.5, None, ["repeat", "repeat"]).identity()["veto"] == ["repeat"]


def test_a_screen_veto_drops_what_its_detector_rejects_besides_the_keep_share(fm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(fm_dir, out, "--retrain-veto", "repeat")) == 0
    rec = json.loads((out / "scan" / "screen.json").read_text())
    assert rec["settings"]["veto"] == ["repeat"]
    keep = json.loads((out / "scan" / "scan.json").read_text())["keep"]
    veto = keep["vetoes"][0]
    assert keep["detector"] == "caption-agreement" and veto["detector"] == "repeat"
    assert rec["kept"] == keep["kept"] == 140 - veto["dropped_by_it_alone"]
    assert f"retrained on {rec['kept']} of 200 pairs" in capsys.readouterr().out


def test_the_python_api_screens_and_retrains_like_the_command(fm_dir, tmp_path):
    import clipguard

    last = clipguard.train(fm_dir / "train.csv", tmp_path / "api", model="cg-nano", epochs=1, batch_size=64,
                           limit=200, device="cpu", quiet=True, retrain_keep=0.5)
    assert last["screen"]["kept"] == 100 and (tmp_path / "api" / "screen" / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="needs --retrain-keep"):
        clipguard.train(fm_dir / "train.csv", tmp_path / "api2", retrain_detector="dao")
