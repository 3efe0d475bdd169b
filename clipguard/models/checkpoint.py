"""Checkpoints as safetensors plus JSON: nothing is ever unpickled.

A training checkpoint is a folder: ``model.safetensors`` (plain open_clip state dict, loadable by
``open_clip.create_model(name, pretrained='model.safetensors')``), ``optimizer.safetensors``
(AdamW moments, flattened), ``strategy.safetensors`` (a defence's tensors, e.g. NN pools) and
``state.json`` (epoch, step, model name, scalars).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipguard.errors import ConfigError
from clipguard.io import atomic_dir

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def resolve_weights(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: only .safetensors checkpoints are read (we never unpickle)")
    return path


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    sd = load_file(str(resolve_weights(path)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not fit the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    f = (path if path.is_dir() else path.parent) / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return _contiguous(tensors), {"scalars": scalars, "param_groups": groups}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: str | Path, model: torch.nn.Module, *, state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the whole folder atomically; an interrupted save leaves the previous one intact."""
    folder = Path(folder)
    state = dict(state)
    with atomic_dir(folder) as tmp:
        save_file(_contiguous(model.state_dict()), str(tmp / MODEL_FILE))
        if optimizer is not None:
            t, meta = optimizer_to_tensors(optimizer)
            save_file(t, str(tmp / "optimizer.safetensors"))
            state["optimizer"] = meta
        for name, tensors in (extra_tensors or {}).items():
            save_file(_contiguous(tensors), str(tmp / f"{name}.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    return folder


def load_tensors(folder: str | Path, name: str) -> dict[str, torch.Tensor]:
    f = Path(folder) / f"{name}.safetensors"
    return load_file(str(f)) if f.is_file() else {}


def update_link(run_dir: Path, target: Path, name: str = "latest") -> None:
    """Point ``checkpoints/latest`` at the newest epoch (a text file: symlinks are fragile)."""
    with_tmp = run_dir / f".{name}.tmp"
    with_tmp.write_text(target.name)
    os.replace(with_tmp, run_dir / name)


def resolve_latest(ckpt_dir: Path) -> Path | None:
    f = ckpt_dir / "latest"
    if f.is_file():
        p = ckpt_dir / f.read_text().strip()
        if (p / STATE_FILE).is_file():
            return p
    cands = sorted(p for p in ckpt_dir.glob("epoch_*") if (p / STATE_FILE).is_file())
    return cands[-1] if cands else None


def prune(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    cands = sorted(p for p in ckpt_dir.glob("epoch_*") if p.is_dir())
    for p in cands[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
