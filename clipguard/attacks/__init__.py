"""Attacks: poison an image-caption CSV (targeted poisoning and backdoors) with a manifest.

``get(name)`` returns an attack class (``get("badnet").build({"size": 4})``); ``poison_csv``
writes a poisoned dataset folder; ``manifest.poison_mask`` marks the poisoned pairs of loaded data.
Each attack is one module in this package, registered with ``@ATTACKS.register(name)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipguard.registry import Registry

if TYPE_CHECKING:
    from clipguard.attacks.base import Attack

_SKIP = {"base", "captions", "patch", "manifest", "writer", "pipeline", "structured"}  # helpers, not attacks
ATTACKS: Registry[type["Attack"]] = Registry("attack", package=__name__, skip=_SKIP)


def get(name: str) -> type["Attack"]:
    return ATTACKS.get(name)


def names() -> list[str]:
    return ATTACKS.names()


def build(name: str, options: dict[str, Any] | None = None) -> "Attack":
    """An attack instance with validated options (unknown options are named in the error)."""
    return get(name).build(options)


def poison_csv(data_csv, attack, **kwargs) -> dict:
    """Write ``out/train.csv`` + ``out/manifest.json`` (and the ASR set with ``eval_csv``); the
    keywords are :func:`clipguard.attacks.pipeline.poison_csv`'s (imported on first call, so
    ``import clipguard.attacks`` stays light)."""
    from clipguard.attacks.pipeline import poison_csv as _poison

    return _poison(data_csv, attack, **kwargs)


__all__ = ["ATTACKS", "get", "names", "build", "poison_csv"]
