"""Checkpoints as safetensors plus JSON; nothing is ever fully unpickled.

A training checkpoint is a folder: ``model.safetensors`` (plain open_clip state dict, loadable by
``open_clip.create_model(name, pretrained='model.safetensors')``), ``optimizer.safetensors``
(AdamW moments, flattened), ``strategy.safetensors`` (a defence's tensors, e.g. NN pools),
``state.json`` (epoch, step, model name, scalars) and, when the model is known,
``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}: open_clip's local-dir format). With it
the folder opens in plain open_clip, without clipguard::

    open_clip.create_model_and_transforms('local-dir:RUN/checkpoints/epoch_003')
    open_clip.get_tokenizer('local-dir:RUN/checkpoints/epoch_003')

(open_clip picks ``model.safetensors`` among the folder's weight files by name, so the weights
are stored once.)

Weights to start from (``finetune --checkpoint``, ``evaluate --checkpoint``, ``create_model``) may
also be a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``) as open_clip and OpenAI-style code write
them: a plain state dict, or a dict holding one under ``state_dict`` (open_clip's training
checkpoints), with or without DDP's ``module.`` prefix. Such a file is read ONLY with
``torch.load(path, map_location="cpu", weights_only=True)``, PyTorch's restricted unpickler, which
builds tensors and plain containers and refuses every other object; a TorchScript archive (OpenAI's
JIT ``.pt``) is refused before torch sees it, since loading one runs its code.

Faults are errors that name the file: a missing, empty, truncated or corrupt safetensors file, a
pickle where safetensors are expected, a pickle that weights_only refuses, a TorchScript archive, a
corrupt ``state.json``, weights of another architecture.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipguard.errors import ConfigError, DataError
from clipguard.io import TMP_SUFFIX, _umask, atomic_dir, is_atomic_temp, write_json, write_text

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_TENSORS = "optimizer"  # load_tensors(folder, OPTIMIZER_TENSORS) reads OPTIMIZER_FILE
OPTIMIZER_FILE = f"{OPTIMIZER_TENSORS}.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# the safetensors names open_clip's local-dir loader prefers, in its order (ours is the last one)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", MODEL_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# torch.save files read as weights (with torch.load(weights_only=True) only)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# entries of OpenAI's CLIP state dict that are not weights of the model (open_clip drops them too)
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
# temporaries of the atomic save before TMP_SUFFIX existed: '.epoch_003.k2j4_x9a', '.epoch_003.old'
_LEGACY_TEMP = re.compile(r"^\.epoch_\d+\.([a-z0-9_]{8}|old)$|^\.latest\.tmp$")
_EPOCH = re.compile(r"^epoch_(\d+)$")

_CONVERT = ("convert it once, in a trusted environment, with safetensors.torch.save_file(torch.load(path, "
            "weights_only=True), 'model.safetensors')")
_CONVERT_HINT = f"clipguard never fully unpickles (a pickle can run code); {_CONVERT}"
_TORCHSCRIPT_HINT = ("convert it once, in an environment you trust, to a plain state dict: python -c \"import "
                     "torch; torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), 'model.pt')\" "
                     "(or with open_clip.load_openai_model), then pass model.pt with --model <arch>-quickgelu")


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _sniff_pickle(path: Path) -> str | None:
    """What kind of pickle ``path`` is, from its first bytes; None when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        return "a PyTorch zip archive (torch.save)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (torch.save's legacy format)"
    return None


def _pretrained_tags() -> set[str]:
    import open_clip

    return {tag for _, tag in open_clip.list_pretrained()}


def _refuse_tag(spec: str, what: str = "checkpoint") -> None:
    if spec.startswith(HF_HUB):
        raise ConfigError(f"{what} '{spec}': clipguard never downloads; fetch the folder yourself "
                          f"and pass it as a local path (with .safetensors weights)")
    if os.sep not in spec and "/" not in spec and spec in _pretrained_tags():
        raise ConfigError(f"{what} '{spec}' is an open_clip pretrained tag: clipguard never downloads "
                          f"weights; download them yourself (.safetensors, or a .pt/.bin state dict) and pass the file")


def resolve_weights(path: str | Path) -> Path:
    """The weights file of a checkpoint: a ``.safetensors`` file, a ``torch.save`` file (``.pt``,
    ``.pth``, ``.bin``; see :func:`read_torch_weights`), a checkpoint folder, or a ``local-dir:``
    folder (its safetensors). Other pickles, tags and hub names are refused with a clear error."""
    spec = str(path)
    if spec.startswith(HF_HUB):
        _refuse_tag(spec)
    if spec.startswith(LOCAL_DIR):
        spec = spec[len(LOCAL_DIR):]
    path = Path(spec)
    if path.is_dir():
        for name in OPEN_CLIP_WEIGHTS:
            if (path / name).is_file():
                return path / name
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            usable = [n for n in pickles if Path(n).suffix in TORCH_SUFFIXES]
            how = (f"pass the file itself (--checkpoint {path / usable[0]}), which is read with "
                   f"torch.load(weights_only=True), or {_CONVERT}"
                   if usable else _CONVERT_HINT)
            raise ConfigError(f"{path}: only pickled weights here ({', '.join(pickles[:3])}), and a folder is "
                              f"read through its .safetensors only; {how}")
        raise ConfigError(f"{path}: no {MODEL_FILE} in this folder (not a finished checkpoint?)")
    if not path.is_file():
        _refuse_tag(spec)
        raise ConfigError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors" and path.suffix not in TORCH_SUFFIXES:
        kind = _sniff_pickle(path)
        what = f" it is {kind};" if kind else ""
        raise ConfigError(f"{path}: weights are read from .safetensors files and torch.save files named "
                          f"{', '.join(TORCH_SUFFIXES)} (with torch.load(weights_only=True));{what} "
                          f"rename a torch.save state dict to .pt, or {_CONVERT}")
    return path


def _non_empty(path: str | Path, what: str) -> Path:
    """``path`` as a Path; a DataError naming the file if it cannot be stat'ed or is empty."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read {what}: {e.strerror or e}", file=str(path)) from None
    if size == 0:
        raise DataError(f"{what} is empty (0 bytes): an interrupted copy or save?", file=str(path))
    return path


def read_tensors(path: str | Path, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a DataError naming the file if it is empty, truncated,
    corrupt or a pickle."""
    path = _non_empty(path, what)
    try:
        return load_file(str(path))
    except SafetensorError as e:
        kind = _sniff_pickle(path)
        if kind:
            raise DataError(f"{what} is {kind}, not safetensors; {_CONVERT_HINT}", file=str(path)) from None
        raise DataError(f"{what} is corrupt or truncated ({e})", file=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read {what}: {e.strerror or e}", file=str(path)) from None


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a zip with code/ and
    constants.pkl), e.g. OpenAI's CLIP ``.pt`` files. Read from the zip's directory only."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names)


def _refusal(e: Exception) -> str:
    """The one line of torch's weights_only refusal that says what it refused."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e), re.DOTALL)
    text = m.group(1) if m else str(e)
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return re.split(r"(?<=\S)\. (?=[A-Z])", line)[0].rstrip(".")[:200]


def read_torch_weights(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The state dict in a ``torch.save`` file, read ONLY with ``torch.load(path, map_location="cpu",
    weights_only=True)`` (PyTorch's restricted unpickler: tensors and plain containers, nothing else).

    Accepts a plain state dict or a dict with one under ``state_dict`` (open_clip's training
    checkpoints: epoch, name, state_dict, optimizer), with or without DDP's ``module.`` prefix;
    entries that are not tensors are ignored. A TorchScript archive (OpenAI's JIT ``.pt``) is refused
    before torch opens it; a file weights_only refuses, or that holds no state dict, is a one-line
    ConfigError naming the file; an empty, truncated or corrupt one a DataError."""
    path = _non_empty(path, what)
    if _is_torchscript(path):
        raise ConfigError(f"{path}: a TorchScript archive (e.g. OpenAI's JIT CLIP .pt), which clipguard does "
                          f"not load (loading it runs its code); {_TORCHSCRIPT_HINT.format(path=path)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols and TorchScript
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = _refusal(e)
        if _sniff_pickle(path) is None:  # neither a torch zip nor a pickle: damaged, or another format
            raise DataError(f"{what} is corrupt or not a torch.save file ({why})", file=str(path)) from None
        holds = ": it holds Python objects besides tensors" if "global" in why.lower() else ""
        raise ConfigError(f"{path}: torch.load(weights_only=True) refused it ({why}){holds}; clipguard reads "
                          f"only tensors and plain containers, never a full unpickle: save only the state dict "
                          f"(torch.save(model.state_dict(), 'model.pt')) in an environment you trust") from None
    except RuntimeError as e:
        if "torchscript" in str(e).lower():
            raise ConfigError(f"{path}: a TorchScript archive, which clipguard does not load; "
                              f"{_TORCHSCRIPT_HINT.format(path=path)}") from None
        raise DataError(f"{what} is corrupt or truncated ({_refusal(e)})", file=str(path)) from None
    except (EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise DataError(f"{what} is corrupt or not a torch.save file ({type(e).__name__}: {e})"[:300],
                        file=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read {what}: {e.strerror or e}", file=str(path)) from None
    return _state_dict_of(obj, path)


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: ``obj`` or ``obj['state_dict']``, ``module.`` stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors, or "
                          f"a dict with one under 'state_dict')")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not sd:
        keys = _first([str(k) for k in obj])
        raise ConfigError(f"{path}: no tensors in it (keys: {keys or 'none'}); expected a state dict, or a "
                          f"dict with one under 'state_dict'")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_weights(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A model's state dict from a safetensors file or, by its name, a torch.save file (.pt, .pth, .bin)."""
    if Path(path).suffix in TORCH_SUFFIXES:
        return read_torch_weights(path, what)
    return read_tensors(path, what)


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_fits(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | Path,
               model_name: str | None = None) -> None:
    """ConfigError naming the model, the file and the first mismatching keys unless ``sd`` is
    exactly ``model``'s state dict (same keys, same shapes)."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} in the file vs {tuple(v.shape)} in the model"
              for k, v in want.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    name = model_name or getattr(model, "clipguard_model_name", None)
    parts = []
    if shapes:
        parts.append(f"shape mismatch: {_first(shapes, 3)}")
    if missing:
        parts.append(f"missing keys: {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_first(unexpected)}")
    path = Path(path)
    try:
        said = read_state(path).get("model") if path.exists() else None
    except DataError:
        said = None
    hint = f" (its state.json says model '{said}')" if said and said != name else ""
    raise ConfigError(f"{path}: weights of another architecture{hint}, they do not fit model "
                      f"'{name or type(model).__name__}': {'; '.join(parts)}")


def load_weights(model: torch.nn.Module, path: str | Path, *, model_name: str | None = None) -> None:
    """Load a checkpoint's weights (file or folder) into ``model``, strictly."""
    f = resolve_weights(path)
    sd = read_weights(f, "weights file")
    want = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in want or k not in OPENAI_EXTRA_KEYS}
    check_fits(model, sd, f, model_name)
    model.load_state_dict(sd, strict=True)


def read_state(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``state.json`` ({} when there is none); a DataError naming it if corrupt."""
    path = Path(path)
    f = (path if path.is_dir() else path.parent) / STATE_FILE
    if not f.is_file():
        return {}
    try:
        obj = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt checkpoint state, not valid JSON ({e})", file=str(f)) from None
    except OSError as e:
        raise DataError(f"cannot read checkpoint state: {e.strerror or e}", file=str(f)) from None
    if not isinstance(obj, dict):
        raise DataError("corrupt checkpoint state: not a JSON object", file=str(f))
    return obj


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
    try:
        for key, v in tensors.items():
            pid, k = key.split(".", 1)
            state.setdefault(int(pid), {})[k] = v
        for key, v in meta["scalars"].items():
            pid, k = key.split(".", 1)
            state.setdefault(int(pid), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"the checkpoint's optimizer state does not fit this optimizer "
                          f"(another model or optimizer settings?): {e}") from None


def open_clip_config(model_name: str | None = None, model_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """open_clip's local-dir/hf-hub ``open_clip_config.json`` for a model: {"model_cfg",
    "preprocess_cfg"}, the preprocessing being clipguard's (resize the short side and centre-crop,
    bicubic, OpenAI mean/std)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    if model_cfg is None:
        if model_name is None:
            raise ValueError("open_clip_config needs model_name or model_cfg")
        from clipguard.models.factory import model_config

        model_cfg = model_config(model_name)
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": size, "mode": "RGB", "mean": list(OPENAI_DATASET_MEAN),
                               "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic",
                               "resize_mode": "shortest", "fill_color": 0}}


def save_checkpoint(folder: str | Path, model: torch.nn.Module, *, state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    model_name: str | None = None, model_cfg: dict[str, Any] | None = None) -> Path:
    """Write the whole folder atomically; an interrupted save leaves the previous one intact.

    With ``model_name`` (or an explicit open_clip ``model_cfg``) the folder also gets
    ``open_clip_config.json``, so plain open_clip opens it as ``local-dir:FOLDER``."""
    folder = Path(folder)
    state = dict(state)
    oc_config = open_clip_config(model_name, model_cfg) if (model_name or model_cfg) else None
    with atomic_dir(folder) as tmp:
        save_file(_contiguous(model.state_dict()), str(tmp / MODEL_FILE))
        if optimizer is not None:
            t, meta = optimizer_to_tensors(optimizer)
            save_file(t, str(tmp / OPTIMIZER_FILE))
            state["optimizer"] = meta
        for name, tensors in (extra_tensors or {}).items():
            save_file(_contiguous(tensors), str(tmp / f"{name}.safetensors"))
        if oc_config is not None:
            write_json(tmp / OPEN_CLIP_CONFIG, oc_config, digits=None)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        mode = 0o666 & ~_umask()  # safetensors writes 0600; outputs follow the umask
        for f in tmp.glob("*.safetensors"):
            os.chmod(f, mode)
    return folder


def drop_optimizer(folder: str | Path) -> int:
    """Remove a finished run's optimizer state from its checkpoint ``folder`` (two thirds of an
    AdamW checkpoint) and return the bytes freed. The weights, the strategy's state and the
    history stay, so the folder still loads, evaluates and re-evaluates; only continuing the
    training from it is no longer possible. ``state.json`` is rewritten first (atomically), so a
    kill in between leaves a state that no longer points at the file, never the reverse."""
    folder = Path(folder)
    f = folder / OPTIMIZER_FILE
    state = read_state(folder)
    if "optimizer" in state:
        state.pop("optimizer")
        state["optimizer_dropped"] = True
        write_text(folder / STATE_FILE, json.dumps(state, indent=2))
    size = f.stat().st_size if f.is_file() else 0
    f.unlink(missing_ok=True)
    return size


def load_tensors(folder: str | Path, name: str) -> dict[str, torch.Tensor]:
    f = Path(folder) / f"{name}.safetensors"
    return read_tensors(f, f"{name} tensors") if f.is_file() else {}


def update_link(run_dir: Path, target: Path, name: str = "latest") -> None:
    """Point ``checkpoints/latest`` at the newest epoch (a text file: symlinks are fragile)."""
    with_tmp = run_dir / f".{name}{TMP_SUFFIX}"
    with_tmp.write_text(target.name)
    os.replace(with_tmp, run_dir / name)


def _finished(p: Path) -> bool:
    return p.is_dir() and not is_atomic_temp(p.name) and (p / STATE_FILE).is_file() \
        and (p / MODEL_FILE).is_file()


def _epoch_folders(ckpt_dir: Path) -> list[Path]:
    """``epoch_N`` folders in epoch order (numeric: epoch_1000 comes after epoch_999)."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("epoch_*")
             if (m := _EPOCH.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_latest(ckpt_dir: Path) -> Path | None:
    """The newest finished checkpoint: the one ``latest`` names, else the last epoch folder with
    its state and weights. Temporaries of an interrupted save are never candidates."""
    ckpt_dir = Path(ckpt_dir)
    f = ckpt_dir / "latest"
    if f.is_file():
        try:
            name = f.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if name and "/" not in name and os.sep not in name and name not in (".", ".."):
            p = ckpt_dir / name
            if _finished(p):
                return p
    cands = [p for p in _epoch_folders(ckpt_dir) if _finished(p)]
    return cands[-1] if cands else None


def is_orphan(name: str) -> bool:
    """Whether a name in a checkpoints folder is a temporary of our own atomic save."""
    return is_atomic_temp(name) or bool(_LEGACY_TEMP.match(name))


def clean_orphans(ckpt_dir: str | Path) -> list[Path]:
    """Remove the temporaries an interrupted save left in ``ckpt_dir`` (only names our atomic
    save creates: '.epoch_003.<random>.cgtmp', '.epoch_003.old.cgtmp', '.latest.cgtmp', and their
    older forms); returns what was removed. Call it before training resumes, never while another
    process is saving into the same folder."""
    ckpt_dir = Path(ckpt_dir)
    removed: list[Path] = []
    if not ckpt_dir.is_dir():
        return removed
    for p in sorted(ckpt_dir.iterdir()):
        if not is_orphan(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                continue
        removed.append(p)
    return removed


def prune(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for p in _epoch_folders(ckpt_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
