"""Attacks: poison an image-caption CSV (targeted poisoning and backdoors) with a manifest.

``get(name)`` returns an attack class (``get("badnet").build({"size": 4})``); ``poison_csv``
writes a poisoned dataset folder; ``manifest.poison_mask`` marks the poisoned pairs of loaded data.
Each attack is one module in this package, registered with ``@ATTACKS.register(name)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipguard.registry import Registry

if TYPE_CHECKING:
    from clipguard.attacks.base import Attack

ATTACKS: Registry[type["Attack"]] = Registry("attack")
_LOADED = False
_SKIP = {"base", "captions", "patch", "manifest", "writer", "pipeline"}


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name not in _SKIP:
            importlib.import_module(f"clipguard.attacks.{mod.name}")


def get(name: str) -> type["Attack"]:
    _load_builtin()
    return ATTACKS.get(name)


def names() -> list[str]:
    _load_builtin()
    return ATTACKS.names()


def build(name: str, options: dict[str, Any] | None = None) -> "Attack":
    """An attack instance with validated options (unknown options are named in the error)."""
    return get(name).build(options)


def poison_csv(data_csv, attack, *, target, rate=None, count=None, seed: int = 0, out,
               eval_csv=None, options=None, spec=None, mode: str = "inject", classes=None,
               trigger_seed=None, overwrite: bool = False) -> dict:
    """Write ``out/train.csv`` + ``out/manifest.json`` (and the ASR set with ``eval_csv``)."""
    from clipguard.attacks.pipeline import poison_csv as _poison

    return _poison(data_csv, attack, target=target, rate=rate, count=count, seed=seed, out=out,
                   eval_csv=eval_csv, options=options, spec=spec, mode=mode, classes=classes,
                   trigger_seed=trigger_seed, overwrite=overwrite)


__all__ = ["ATTACKS", "get", "names", "build", "poison_csv"]
