"""Models come from open_clip's model API, so every checkpoint we write loads in open_clip.

Our tiny CPU configurations are ordinary open_clip JSON configs, registered with
``open_clip.add_model_config``; any other open_clip architecture name (RN50, ViT-B-32, ...) works
the same way, with random weights or a local checkpoint (never a hub download).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch

from clipguard.errors import ConfigError
from clipguard.models.tokenizer import CachedTokenizer
from clipguard.registry import Registry

CONFIG_DIR = Path(__file__).parent / "configs"
MODELS: Registry[Path] = Registry("model")
_registered = False


def _register_configs() -> None:
    global _registered
    if _registered:
        return
    open_clip.add_model_config(CONFIG_DIR)
    for cfg in sorted(CONFIG_DIR.glob("*.json")):
        MODELS.register(cfg.stem)(cfg)
    _registered = True


def list_models() -> list[str]:
    """Our tiny configs first, then every open_clip architecture."""
    _register_configs()
    ours = MODELS.names()
    return ours + [m for m in open_clip.list_models() if m not in ours]


def model_config(name: str) -> dict[str, Any]:
    _register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown model '{name}'; see `clipguard models` for the names")
    return cfg


def create_model(name: str, *, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu", seed: int | None = None) -> torch.nn.Module:
    """Build an open_clip model by name; random init (seeded) or weights from a local file."""
    model_config(name)
    if seed is not None:
        torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, device=device)
    if checkpoint is not None:
        from clipguard.models.checkpoint import load_weights

        load_weights(model, checkpoint)
    return model


_TOKENIZERS: dict[str, CachedTokenizer] = {}


def get_tokenizer(name: str) -> CachedTokenizer:
    """open_clip's tokenizer for the model (it keeps the end-of-text token when truncating),
    behind an exact memo shared by every caller in the process."""
    if name not in _TOKENIZERS:
        model_config(name)
        _TOKENIZERS[name] = CachedTokenizer(open_clip.get_tokenizer(name))
    return _TOKENIZERS[name]


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
