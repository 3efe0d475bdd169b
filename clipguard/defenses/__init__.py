"""Defences are trainer strategies, registered by name (``clipguard train --defense NAME``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clipguard.errors import ConfigError
from clipguard.options import Options
from clipguard.registry import Registry
from clipguard.training.strategy import ClipStrategy, Strategy

DEFENSES: Registry[type[Strategy]] = Registry("defense", package=__name__)
DEFENSES.register("none")(ClipStrategy)
DEFENSES.register("ft")(ClipStrategy)  # clean fine-tuning is the plain CLIP loss on clean data


def names() -> list[str]:
    return DEFENSES.names()


def get(name: str) -> type[Strategy]:
    return DEFENSES.get(name)


def options_class(name: str) -> type[Options]:
    """The options dataclass of a registered defence."""
    return get(name).options_class


def resolve_options(name: str, options: dict[str, Any] | Options | None = None, *, where: str = "") -> Options:
    """Validated options of defence ``name`` from a mapping (or pass an options object through)."""
    cls = options_class(name)
    if isinstance(options, Options):
        if not isinstance(options, cls):
            raise ConfigError(f"{where + ': ' if where else ''}defense '{name}' takes {cls.__name__}, "
                              f"got {type(options).__name__}")
        options.check(where)
        return options
    return cls.from_dict(options, where=where)


def build(name: str, options: dict[str, Any] | Options | None = None, *, where: str = "") -> Strategy:
    """Instantiate a defence with validated options; a bad key or value is a ConfigError naming it."""
    strat = get(name)(resolve_options(name, options, where=where))
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
