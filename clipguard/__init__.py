"""clipguard: train and fine-tune CLIP models that resist data poisoning and backdoors.

The Python API lives at the package root (see :mod:`clipguard.api`): ``clipguard.poison``,
``clipguard.train``, ``clipguard.finetune``, ``clipguard.evaluate``, ``clipguard.scan``,
``clipguard.load_model``,
``clipguard.fashion_mnist``, ``clipguard.load_data`` and ``clipguard.run_spec``. They are
imported on first use, so ``import clipguard`` (and the CLI's start-up) stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

API = ("fashion_mnist", "load_data", "poison", "run_spec", "train", "finetune", "evaluate", "scan", "load_model")
__all__ = ["__version__", *API, "register_model_configs"]


def __getattr__(name: str) -> Any:
    if name in API:
        from clipguard import api

        return getattr(api, name)
    if name == "register_model_configs":
        from clipguard.models import register_model_configs

        return register_model_configs
    raise AttributeError(f"module 'clipguard' has no attribute {name!r}")
