"""Defences are trainer strategies, registered by name (``clipguard train --defense NAME``)."""

from __future__ import annotations

from typing import Any

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
