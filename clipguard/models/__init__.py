"""Models through open_clip's model API; see factory.py."""

from clipguard.models.checkpoint import clean_orphans, load_weights, resolve_latest, save_checkpoint
from clipguard.models.device import resolve_device
from clipguard.models.factory import (
    create_model,
    get_tokenizer,
    image_size,
    list_models,
    model_config,
    register_model_configs,
)

__all__ = ["create_model", "get_tokenizer", "image_size", "list_models", "model_config",
           "register_model_configs", "resolve_device", "load_weights", "save_checkpoint",
           "resolve_latest", "clean_orphans"]
