"""Models through open_clip's model API; see factory.py."""

from clipguard.models.checkpoint import load_weights, save_checkpoint
from clipguard.models.factory import create_model, get_tokenizer, image_size, list_models, model_config

__all__ = ["create_model", "get_tokenizer", "image_size", "list_models", "model_config",
           "load_weights", "save_checkpoint"]
