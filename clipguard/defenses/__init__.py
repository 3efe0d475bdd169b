"""Defences are trainer strategies, registered by name (``clipguard train --defense NAME``)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from clipguard.errors import ConfigError
from clipguard.registry import Registry
from clipguard.training.strategy import ClipStrategy, Strategy

DEFENSES: Registry[type[Strategy]] = Registry("defense", package=__name__)
DEFENSES.register("none")(ClipStrategy)
DEFENSES.register("ft")(ClipStrategy)  # clean fine-tuning is the plain CLIP loss on clean data


def names() -> list[str]:
    return DEFENSES.names()


def get(name: str) -> type[Strategy]:
    return DEFENSES.get(name)


def build(name: str, options: dict[str, Any] | None = None) -> Strategy:
    """Instantiate a defence with options, naming any option it does not take."""
    cls = get(name)
    options = dict(options or {})
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p != "self"]
    bad = [k for k in options if k not in known]
    if bad:
        raise ConfigError(f"defense '{name}' has no option(s) {bad}; it takes {known}")
    strat = cls(**options)
    strat.name = name
    return strat


def load_preset(path: str | Path) -> dict[str, Any]:
    """A YAML preset: ``defense: NAME`` plus ``options: {...}`` and optional ``train: {...}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preset not found: {path}")
    obj = yaml.safe_load(path.read_text()) or {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a preset is a mapping with keys defense/options/train")
    return obj


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings; values parsed as YAML scalars (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"option {p!r} must look like key=value")
        k, v = p.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out
