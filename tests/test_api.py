"""The package-root Python API: a short script poisons, trains, fine-tunes and evaluates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import clipguard
from clipguard.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(run):
    c = run / "checkpoints"
    return load_file(str(c / (c / "latest").read_text().strip() / "model.safetensors"))


def test_script_poisons_trains_finetunes_and_evaluates(fm_dir, tmp_path):
    m = clipguard.poison(fm_dir / "train.csv", "badnet", target="bag", count=16, out=tmp_path / "bad",
                         eval_data=fm_dir / "test.csv", seed=0)
    assert len(m["poisoned_rows"]) == 16
    common = dict(model="cg-nano", epochs=1, batch_size=64, warmup=1, device="cpu", quiet=True, limit=256)
    last = clipguard.train(tmp_path / "bad" / "train.csv", tmp_path / "clip", **common)
    assert last["epoch"] == 1
    ft = clipguard.finetune(tmp_path / "clip", fm_dir / "train.csv", tmp_path / "ft", defense="cleanclip",
                            epochs=1, batch_size=32, lr=1e-4, quiet=True)
    assert ft["epoch"] == 1
    res = clipguard.evaluate(tmp_path / "ft", fm_dir / "test.csv",
                             attack_manifest=tmp_path / "bad" / "manifest.json")
    assert 0.0 <= res["metrics"]["zeroshot"]["acc1"] <= 1.0 and "attack" in res["metrics"]
    model, tok = clipguard.load_model(tmp_path / "ft")
    assert model.encode_text(tok(["a bag"]), normalize=True).shape[0] == 1
    # the learning-rate search of `clipguard finetune --lr-search`, from Python
    res = clipguard.finetune(tmp_path / "clip", fm_dir / "train.csv", tmp_path / "search", defense="ft",
                             eval_data=fm_dir / "test.csv", lr_search=[1e-3, 1e-5], budget=100, select="drift", epochs=1,
                             batch_size=64, quiet=True)
    assert [c["lr"] for c in res["candidates"]] == [1e-5, 1e-3] and res["chosen"]["lr"] == 1e-3
    assert (tmp_path / "search" / "lr-search.json").is_file() and (tmp_path / "search" / "params.json").is_file()


def test_python_and_cli_runs_are_the_same_run(fm_dir, tmp_path):
    clipguard.train(fm_dir / "train.csv", tmp_path / "py", model="cg-nano", epochs=1, batch_size=64,
                    warmup=1, device="cpu", quiet=True, limit=128, seed=3)
    assert main(["train", "--data", str(fm_dir / "train.csv"), "--out", str(tmp_path / "cli"), "--model",
                 "cg-nano", "--epochs", "1", "--batch-size", "64", "--warmup", "1", "--device", "cpu",
                 "--quiet", "--limit", "128", "--seed", "3"]) == 0
    a, b = _weights(tmp_path / "py"), _weights(tmp_path / "cli")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa = json.loads((tmp_path / "py" / "params.json").read_text())["run"]
    pb = json.loads((tmp_path / "cli" / "params.json").read_text())["run"]
    assert pa == pb


def test_run_spec_and_registration_are_public():
    spec = clipguard.run_spec(defense="safeclip", epochs=20)
    assert spec.defense == "safeclip" and spec.train.epochs == 20
    assert "cg-tiny" in clipguard.register_model_configs()
    with pytest.raises(AttributeError):
        clipguard.no_such_thing  # noqa: B018


def test_finetune_takes_the_presets_defence_as_the_command_does(monkeypatch):
    """A preset that names its defence needs no ``defense=``; without either, ``ft``."""
    from pathlib import Path

    import clipguard.training.run as run_module
    from clipguard.errors import ConfigError

    seen = []
    monkeypatch.setattr(run_module, "finetune_start", lambda checkpoint, model=None: ("w.safetensors", "cg-nano"))
    monkeypatch.setattr(run_module, "train_run", lambda run, *a, **k: seen.append(run) or {})
    preset = Path(__file__).resolve().parents[1] / "configs" / "cleanclip-tiny.yaml"
    clipguard.finetune("ck", "d.csv", "out", preset=preset)
    clipguard.finetune("ck", "d.csv", "out")
    assert [r.defense for r in seen] == ["cleanclip", "ft"]
    with pytest.raises(ConfigError, match="is for defense 'cleanclip'"):
        clipguard.finetune("ck", "d.csv", "out", preset=preset, defense="par")
