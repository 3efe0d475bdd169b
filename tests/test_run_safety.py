"""Run folders: a finished run is never silently replaced, one writer at a time, nothing lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipguard.cli import main
from clipguard.io import read_jsonl
from clipguard.training.run_dir import LOCK_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(fm_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(fm_dir / "train.csv"), "--out", str(out), "--model", "cg-nano",
                 "--limit", "128", "--epochs", "2", "--batch-size", "64", "--warmup", "1", "--device", "cpu",
                 "--quiet", *extra])


def _latest(out: Path) -> Path:
    c = out / "checkpoints"
    return c / (c / "latest").read_text().strip()


def test_finished_run_is_refused_then_overwritten_keeping_user_files(fm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(fm_dir, out) == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "params.json").read_text()
    assert _train(fm_dir, out, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "--resume latest" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "params.json").read_text() == before  # nothing rewritten
    assert _train(fm_dir, out, "--seed", "1", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "params.json").read_text())["train"]["seed"] == 1
    assert [r["epoch"] for r in read_jsonl(out / "results.jsonl")] == [1, 2]
    assert (out / "out.log").is_file() and "finished after epoch 2/2" in (out / "out.log").read_text()
    assert not (out / LOCK_FILE).exists()


def test_state_json_counts_finished_epochs_and_checkpoints_open_in_open_clip(fm_dir, tmp_path):
    out = tmp_path / "run"
    assert _train(fm_dir, out, "--keep-checkpoints", "2") == 0
    for n in (1, 2):
        state = json.loads((out / "checkpoints" / f"epoch_{n:03d}" / "state.json").read_text())
        assert state["epoch"] == n and [r["epoch"] for r in state["history"]] == list(range(1, n + 1))
        assert (out / "checkpoints" / f"epoch_{n:03d}" / "open_clip_config.json").is_file()


def test_resume_with_other_settings_is_refused(fm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(fm_dir, out, "--stop-after", "1") == 0
    assert _train(fm_dir, out, "--resume", "latest", "--batch-size", "32") == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "Traceback" not in err
    assert _train(fm_dir, out, "--resume", "latest") == 0
    assert [r["epoch"] for r in read_jsonl(out / "results.jsonl")] == [1, 2]


def test_a_kill_between_checkpoint_and_results_line_loses_nothing(fm_dir, tmp_path):
    """Simulate the kill: epoch 2's checkpoint exists but its results line never got written,
    and an interrupted save left a temp folder behind."""
    out = tmp_path / "run"
    assert _train(fm_dir, out) == 0
    full = read_jsonl(out / "results.jsonl")
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n")
    orphan = out / "checkpoints" / ".epoch_003.abc123.cgtmp"
    orphan.mkdir()
    assert _train(fm_dir, out, "--resume", "latest") == 0  # nothing left to train
    assert read_jsonl(out / "results.jsonl") == full  # epoch 2's line came back from the checkpoint
    assert not orphan.exists()


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(fm_dir, tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert _train(fm_dir, out) == 2
    assert "another run is writing" in capsys.readouterr().err
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    assert _train(fm_dir, out) == 0
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("args, match", [
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch-size", "-4"], "batch_size must be >= 1"),
    (["--accum-steps", "0"], "accum_steps must be >= 1"),
    (["--lr", "nan"], "finite"),
    (["--lr", "inf"], "finite"),
    (["--lr", "1e9"], "lr must be in"),
    (["--limit", "0"], "limit"),
    (["--opt", "warmup_epochs=abc", "--defense", "safeclip"], "warmup_epochs"),
    (["--defense", "cleanclip", "--opt", "lambda2=-1"], "lambda2"),
    (["--defense", "safeclp"], "unknown defense"),
    (["--classes", "nowhere.json"], "--eval-data"),
])
def test_bad_train_arguments_exit_2_without_traceback(fm_dir, tmp_path, capsys, args, match):
    out = tmp_path / "run"
    assert _train(fm_dir, out, *args) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (out / "params.json").exists()


def test_out_that_is_a_file_is_refused(fm_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert _train(fm_dir, f) == 2
    assert "not a folder" in capsys.readouterr().err and f.read_text() == "x"
