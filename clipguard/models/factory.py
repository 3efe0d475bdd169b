"""Models come from open_clip's model API, so every checkpoint we write loads in open_clip.

Our tiny CPU configurations are ordinary open_clip JSON configs, registered with
``open_clip.add_model_config`` (``register_model_configs``); any other open_clip architecture name
(RN50, ViT-B-32, ...) works the same way, with random weights or a local checkpoint, and so does
``local-dir:PATH`` (a folder with open_clip_config.json and .safetensors weights, e.g. one of our
checkpoint folders).

clipguard never downloads and never fully unpickles: ``hf-hub:`` names, pretrained tags ('openai',
'laion2b_...') and architectures whose text tower or tokenizer open_clip fetches from the Hugging
Face Hub are refused with a ConfigError; a local-dir folder is read only through its safetensors,
and a ``.pt``/``.bin`` weights file only with ``torch.load(weights_only=True)`` (see checkpoint.py).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipguard.errors import ConfigError, DataError, did_you_mean
from clipguard.models.device import resolve_device
from clipguard.models.text_trim import enable_text_trim, trim_wanted
from clipguard.models.tokenizer import CachedTokenizer
from clipguard.registry import Registry

log = logging.getLogger("clipguard")

CONFIG_DIR = Path(__file__).parent / "configs"
MODELS: Registry[Path] = Registry("model")
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
_NEVER = "clipguard never downloads"

__all__ = ["MODELS", "create_model", "get_tokenizer", "image_size", "list_models", "model_config", "model_image_size",
           "needs_download", "register_model_configs", "resolve_device"]


def register_model_configs() -> list[str]:
    """Register clipguard's tiny configs (cg-nano, cg-tiny, ...) with ``open_clip.add_model_config``
    so that plain open_clip knows them, e.g. ``open_clip.create_model('cg-tiny',
    pretrained='.../model.safetensors')``. Idempotent; returns their names."""
    if not MODELS.names():
        for cfg in sorted(CONFIG_DIR.glob("*.json")):
            MODELS.register(cfg.stem)(cfg)
    names = MODELS.names()
    known = set(open_clip.list_models())
    if not all(n in known for n in names):
        paths = getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", None)
        if paths is not None and CONFIG_DIR in paths:
            open_clip.factory._rescan_model_configs()
        else:
            open_clip.add_model_config(CONFIG_DIR)
    return names


_register_configs = register_model_configs  # the former private name


def _local_dir_config(name: str) -> dict[str, Any]:
    folder = Path(name[len(LOCAL_DIR):])
    f = folder / OPEN_CLIP_CONFIG
    if not folder.is_dir():
        raise ConfigError(f"model '{name}': folder not found: {folder}")
    if not f.is_file():
        raise ConfigError(f"model '{name}': {f} not found (a local-dir model folder needs "
                          f"open_clip_config.json with 'model_cfg')")
    from clipguard.io import read_json_object

    obj = read_json_object(f, "open_clip config")
    cfg = obj.get("model_cfg")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise DataError("needs 'model_cfg' with embed_dim, vision_cfg and text_cfg", file=str(f),
                        field="model_cfg")
    return cfg


def needs_download(name: str, cfg: dict[str, Any] | None = None) -> str | None:
    """Why open_clip would reach the network to build or tokenize for ``name`` (None: it would not)."""
    if name.startswith(HF_HUB):
        return "hf-hub: models are fetched from the Hugging Face Hub"
    if cfg is None:
        cfg = open_clip.get_model_config(name) if not name.startswith(LOCAL_DIR) else _local_dir_config(name)
        if cfg is None:
            return None
    text = cfg.get("text_cfg") or {}
    if text.get("hf_model_name"):
        return f"its text tower is the Hugging Face model '{text['hf_model_name']}', which open_clip downloads"
    if text.get("hf_tokenizer_name") and not name.startswith(LOCAL_DIR):
        return f"its tokenizer '{text['hf_tokenizer_name']}' is downloaded from the Hugging Face Hub"
    if not name.startswith(LOCAL_DIR) and "siglip" in name.lower():
        return "its SigLIP tokenizer vocabulary is downloaded"
    return None


def list_models(include_download: bool = False) -> list[str]:
    """Our tiny configs first, then every open_clip architecture that builds offline (with
    ``include_download``: also those open_clip would download a text tower or tokenizer for)."""
    ours = register_model_configs()
    rest = [m for m in open_clip.list_models() if m not in ours]
    if not include_download:
        rest = [m for m in rest if needs_download(m) is None]
    return ours + rest


def model_config(name: str) -> dict[str, Any]:
    """open_clip's config dict for a model name or ``local-dir:PATH``; ConfigError for unknown
    names and for anything that would need a download."""
    register_model_configs()
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("empty model name; see `clipguard models` for the names")
    if name.startswith(HF_HUB):
        raise ConfigError(f"model '{name}': {_NEVER} (hf-hub: fetches from the Hugging Face Hub); "
                          f"download the folder yourself and pass --model local-dir:PATH "
                          f"(open_clip_config.json and .safetensors weights)")
    if name.startswith(LOCAL_DIR):
        cfg = _local_dir_config(name)
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ConfigError(f"unknown model '{name}'{did_you_mean(name, open_clip.list_models())}; "
                              f"see `clipguard models` for the names")
    why = needs_download(name, cfg)
    if why:
        raise ConfigError(f"model '{name}': {why}; {_NEVER}")
    return cfg


def _local_dir_weights(name: str) -> Path | None:
    """The safetensors weights of a local-dir folder (None: a config-only folder); a folder with
    only pickled weights is refused rather than handed to torch.load."""
    from clipguard.models.checkpoint import resolve_weights

    folder = Path(name[len(LOCAL_DIR):])
    if not any(p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
               for p in folder.iterdir()):
        return None
    return resolve_weights(folder)


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns that a model was "initialized randomly" whenever it loads no weights itself,
    also when clipguard loads a checkpoint into it right after: every bench cell and every command
    printed it. Whether weights were loaded is clipguard's to say (run logs, ``params.json``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init():
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def create_model(name: str, *, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu", seed: int | None = None,
                 pretrained: str | Path | None = None, trim_text: bool | None = None) -> torch.nn.Module:
    """Build an open_clip model by name; random init (seeded) or weights from a local
    safetensors file, torch.save state dict (.pt/.pth/.bin) or checkpoint folder (``checkpoint``;
    ``pretrained`` is an alias that refuses
    open_clip's download tags). A ``local-dir:`` model loads its folder's weights by default.
    ``trim_text``: encode captions without their padding where that gives the same features
    (``models/text_trim.py``); None: on a GPU only, so that CPU runs stay bit-identical to
    those made before it existed (on the CPU it moves results in the last bits)."""
    model_config(name)
    if pretrained is not None:
        if checkpoint is not None:
            raise ConfigError("pass the weights as checkpoint or pretrained, not both")
        checkpoint = pretrained
    dev = resolve_device(device)
    if seed is not None:
        torch.manual_seed(seed)
    with _quiet_random_init():
        if name.startswith(LOCAL_DIR):
            if checkpoint is None:
                checkpoint = _local_dir_weights(name)
            # load_weights=False: open_clip would torch.load whatever weight file it finds there
            model = open_clip.create_model(name, load_weights=False, device=dev)
        else:
            model = open_clip.create_model(name, pretrained=None, device=dev)
    model.clipguard_model_name = name
    if checkpoint is not None:
        from clipguard.models.checkpoint import load_weights

        load_weights(model, checkpoint, model_name=name)
    if trim_wanted(trim_text, dev) and not enable_text_trim(model) and trim_text:  # asked for, not possible
        log.warning("trim_text: model '%s' keeps open_clip's encode_text (its text tower is not open_clip's "
                    "causal CLIP tower read at the end-of-text token, or a probe gave other features)", name)
    return model


_TOKENIZERS: dict[str, CachedTokenizer] = {}


def get_tokenizer(name: str) -> CachedTokenizer:
    """open_clip's tokenizer for the model (it keeps the end-of-text token when truncating),
    behind an exact memo shared by every caller in the process."""
    if name not in _TOKENIZERS:
        model_config(name)
        _TOKENIZERS[name] = CachedTokenizer(open_clip.get_tokenizer(name))
    return _TOKENIZERS[name]


def model_image_size(name: str) -> int:
    """The input size of the architecture ``name``, from its config (no model is built)."""
    size = model_config(name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
