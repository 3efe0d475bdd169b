"""``clipguard poison`` end to end on tiny data, and its errors (exit 2, message, nothing written)."""

from __future__ import annotations

import json

import pytest
from _attack_data import make_dataset

from clipguard.cli import main


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("syn") / "syn")


def test_poison_command_writes_dataset_manifest_and_asr_set(ds, tmp_path, capsys):
    train, test = ds
    rc = main(["poison", "--data", str(train), "--attack", "badnet", "--target", "star", "--rate", "0.05",
               "--seed", "1", "--out", str(tmp_path / "p"), "--eval-data", str(test),
               "--opt", "size=3", "--opt", "location=corners"])
    assert rc == 0
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["count"] == 3 and m["params"]["location"] == "corners" and m["eval"]["n_images"] == 12
    assert (tmp_path / "p" / "asr_eval.csv").is_file() and (tmp_path / "p" / "classes.json").is_file()
    assert "3 poisoned by badnet" in capsys.readouterr().out


def test_poison_list(capsys):
    assert main(["poison", "--list"]) == 0
    out = capsys.readouterr().out
    assert "badclip (backdoor): options checkpoint" in out and "tdpa (tdpa)" in out


@pytest.mark.parametrize("extra,msg", [
    (["--attack", "badnet", "--target", "hexagon", "--rate", "0.1"], "unknown class 'hexagon'"),
    (["--attack", "badnet", "--target", "star", "--rate", "2"], "--rate must be in (0, 1]"),
    (["--attack", "badnet", "--target", "star", "--rate", "0.001"], "yields no poisoned pair"),
    (["--attack", "badnet", "--target", "star", "--count", "2", "--opt", "size=40"], "larger than the 12x12 image"),
    (["--attack", "badclip", "--target", "star", "--count", "2"], "pass --checkpoint"),
    (["--attack", "badnet", "--target", "star", "--count", "2", "--steps", "3"], "--steps only applies"),
    (["--attack", "nope", "--target", "star", "--count", "2"], "unknown attack 'nope'"),
])
def test_poison_command_errors(ds, tmp_path, capsys, extra, msg):
    train, _ = ds
    rc = main(["poison", "--data", str(train), "--out", str(tmp_path / "p")] + extra)
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
