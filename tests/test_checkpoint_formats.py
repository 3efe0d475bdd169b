"""Weights from any open_clip / OpenAI-style ``torch.save`` file (.pt, .pth, .bin), read only with
``torch.load(weights_only=True)``: every form loads through the path the commands use, and
anything that is not plain tensors is refused with one line, without ever being constructed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipguard.cli import main
from clipguard.errors import ConfigError, DataError
from clipguard.evaluation.runner import load_model
from clipguard.models.factory import create_model
from clipguard.training.run import finetune_start

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def source():
    """The model whose weights every file holds (seed 1: unlike a fresh seed-0 model)."""
    return create_model("cg-nano", seed=1)


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(model, sd) -> bool:
    got = model.state_dict()
    return got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


FORMS = {
    "plain": lambda sd: sd,
    "open_clip-train": lambda sd: {"epoch": 3, "name": "run", "state_dict": sd,
                                   "optimizer": {"state": {0: {"step": torch.tensor(5.0)}},
                                                 "param_groups": [{"lr": 1e-3, "params": [0]}]}},
    "ddp-prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "open_clip-train-ddp": lambda sd: {"epoch": 1, "name": "run",
                                       "state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "non-tensor-entries": lambda sd: {**sd, "note": "trained on x", "version": 2, "shape": [1, 2]},
    "openai-extras": lambda sd: {**sd, "input_resolution": torch.tensor(28), "context_length": torch.tensor(20),
                                 "vocab_size": torch.tensor(49408)},
}


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_loads_through_the_command_path(form, suffix, source, tmp_path):
    f = tmp_path / f"weights{suffix}"
    torch.save(FORMS[form](_sd(source)), f)
    weights, name = finetune_start(f, "cg-nano")            # what `clipguard finetune` does
    assert Path(weights) == f and name == "cg-nano"
    assert _equal(create_model(name, checkpoint=weights), _sd(source))
    model, _ = load_model(f, "cg-nano")                     # what `clipguard evaluate` does
    assert _equal(model, _sd(source))


def test_legacy_torch_save_format_and_half_precision(source, tmp_path):
    f = tmp_path / "legacy.pt"
    torch.save({k: v.half() for k, v in _sd(source).items()}, f, _use_new_zipfile_serialization=False)
    model = create_model("cg-nano", checkpoint=f)
    want = {k: v.half().float() for k, v in _sd(source).items()}
    assert _equal(model, want)


def test_weights_only_is_the_only_reader(source, tmp_path, monkeypatch):
    f = tmp_path / "w.pt"
    torch.save(_sd(source), f)
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    create_model("cg-nano", checkpoint=f)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


class _WritesAFile:
    """Unpickling this object would call open(marker, 'w'): the file appearing means code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "raw-pickle"])
def test_a_pickled_object_is_refused_and_never_built(how, source, tmp_path, capsys):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    payload = {**_sd(source), "hook": _WritesAFile(marker)}
    if how == "torch.save":
        torch.save(payload, f)
    else:
        f.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(ConfigError if how == "torch.save" else (ConfigError, DataError)) as e:
        create_model("cg-nano", checkpoint=f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    if how == "torch.save":
        assert "weights_only" in str(e.value) and "io.open" in str(e.value)
    assert not marker.exists()
    rc = main(["evaluate", "--checkpoint", str(f), "--model", "cg-nano", "--data", str(tmp_path / "none.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(f) in err
    assert not marker.exists()


def test_torchscript_archive_is_a_clear_error(tmp_path, capsys):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(torch.nn.Linear(2, 2))
    f = tmp_path / "ViT-B-32.pt"
    scripted.save(str(f))
    with pytest.raises(ConfigError, match=r"TorchScript archive.*convert it once.*state_dict\(\)") as e:
        create_model("cg-nano", checkpoint=f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    rc = main(["evaluate", "--checkpoint", str(f), "--model", "cg-nano", "--data", str(tmp_path / "none.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "TorchScript" in err


BAD = {
    "not-a-dict": (lambda f, sd: torch.save(torch.zeros(3), f), ConfigError, "holds a Tensor, not a state dict"),
    "no-tensors": (lambda f, sd: torch.save({"epoch": 3, "name": "x"}, f), ConfigError, "no tensors in it"),
    "other-architecture": (lambda f, sd: torch.save(create_model("cg-tiny", seed=0).state_dict(), f), ConfigError,
                           "weights of another architecture"),
    "truncated": (lambda f, sd: (torch.save(sd, f), f.write_bytes(f.read_bytes()[:2000])), DataError,
                  "corrupt or truncated"),
    "empty": (lambda f, sd: f.write_bytes(b""), DataError, "empty (0 bytes)"),
    "garbage": (lambda f, sd: f.write_bytes(os.urandom(512)), DataError, "corrupt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_torch_files_name_the_file(case, source, tmp_path):
    write, exc, needle = BAD[case]
    f = tmp_path / "w.pt"
    write(f, _sd(source))
    with pytest.raises(exc, match="^.*" + needle.replace("(", r"\(").replace(")", r"\)")) as e:
        create_model("cg-nano", checkpoint=f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_other_pickle_suffixes_and_pickle_only_folders_stay_refused(source, tmp_path):
    f = tmp_path / "w.ckpt"
    torch.save(_sd(source), f)
    with pytest.raises(ConfigError, match=r"weights are read from \.safetensors files and torch\.save files"):
        create_model("cg-nano", checkpoint=f)
    d = tmp_path / "folder"
    d.mkdir()
    torch.save(_sd(source), d / "open_clip_pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"only pickled weights here.*pass the file itself.*open_clip_pytorch_model"):
        create_model("cg-nano", checkpoint=d)
    assert _equal(create_model("cg-nano", checkpoint=d / "open_clip_pytorch_model.bin"), _sd(source))


def test_finetune_end_to_end_from_a_pt_file(fm_dir, source, tmp_path):
    f = tmp_path / "epoch_2.pt"
    torch.save({"epoch": 2, "name": "x", "state_dict": {f"module.{k}": v for k, v in _sd(source).items()}}, f)
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(f), "--model", "cg-nano", "--data", str(fm_dir / "train.csv"),
                 "--out", str(out), "--epochs", "1", "--batch-size", "32", "--limit", "64", "--lr", "0",
                 "--device", "cpu", "--quiet"]) == 0
    params = json.loads((out / "params.json").read_text())
    assert params["train"]["checkpoint"] == str(f) and params["train"]["model"] == "cg-nano"
    last = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    after = load_file(str(last / "model.safetensors"))             # lr 0: exactly the .pt's weights
    want = _sd(source)
    assert after.keys() == want.keys() and all(torch.equal(after[k], want[k]) for k in want)
    # without --model a bare .pt names no model: a clear error, not a guess
    rc = main(["finetune", "--checkpoint", str(f), "--data", str(fm_dir / "train.csv"), "--out", str(tmp_path / "x")])
    assert rc == 2
