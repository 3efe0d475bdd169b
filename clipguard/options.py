"""Typed, self-validating options: one dataclass per defence (and the trainer's settings).

Options reach a run from CLI ``--opt key=value`` strings, YAML presets and bench entries. They
all pass through :meth:`Options.from_dict`, which names an unknown key (with the closest known
one), converts strings such as ``"5"`` or ``"true"`` by the field's type, and refuses a value of
the wrong type, so a typo ends in a one-line :class:`ConfigError`, never a traceback or a
silently ignored setting. ``validate`` then checks ranges and combinations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar

from clipguard.errors import ConfigError, did_you_mean

OptionsT = TypeVar("OptionsT", bound="Options")


class Options:
    """Base of every options dataclass. Subclasses are ``@dataclass`` and override ``validate``."""

    kind: ClassVar[str] = "options"  # what the error messages call the owner, e.g. "defense 'safeclip'"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[OptionsT], values: dict[str, Any] | None, *, where: str = "") -> OptionsT:
        """Build from a mapping, naming the first unknown or ill-typed key."""
        values = dict(values or {})
        prefix = f"{where}: " if where else ""
        known = cls.field_names()
        for key in values:
            if key not in known:
                raise ConfigError(f"{prefix}{cls.kind} has no option '{key}'{did_you_mean(key, known)}; "
                                  f"it takes: {', '.join(known)}")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None

    def __post_init__(self) -> None:
        """Convert every field by its type (``"5"`` -> 5), then check ranges: no object is ever invalid."""
        hints = _hints(type(self))
        for name in self.field_names():
            setattr(self, name, coerce(getattr(self, name), hints[name], f"{self.kind}: option '{name}'"))
        self.check()

    def check(self, where: str = "") -> None:
        """Run ``validate`` and turn its ValueErrors into ConfigErrors that name the owner."""
        try:
            self.validate()
        except ValueError as e:
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}{self.kind}: {e}") from None

    def validate(self) -> None:
        """Raise ValueError('option X must ...') for values out of range."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def identity(self) -> dict[str, Any]:
        """What a run's fingerprint hashes: every option, except one declared with
        ``field(default=..., metadata={"neutral": V})`` while it holds V, the value at which it
        does nothing. An option added later declares the value that reproduces the runs made before
        it existed, so adding it leaves every finished run (and cached bench cell) valid. An option
        declared with ``metadata={"only_with": "other"}`` shapes what ``other`` turns on, and is left
        out too while ``other`` is off: None, or itself left out by its own ``only_with`` (an option of
        an option of a veto that is off does nothing either), whatever its own value."""
        values = self.to_dict()
        fields = {f.name: f for f in dataclasses.fields(self)}  # type: ignore[arg-type]

        def off(name: str) -> bool:
            other = fields[name].metadata.get("only_with")
            return values[name] is None or (other is not None and off(other))

        out = dict(values)
        for name, f in fields.items():
            neutral = "neutral" in f.metadata and values[name] == f.metadata["neutral"]
            if neutral or ("only_with" in f.metadata and off(f.metadata["only_with"])):
                del out[name]
        return out

    def replace(self: OptionsT, **changes: Any) -> OptionsT:
        return type(self).from_dict({**self.to_dict(), **changes})


# ---------------------------------------------------------------------------- coercion
@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, what: str) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, Literal, Optional, list/tuple of those)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a, what)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{what}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{what} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{what} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(v, inner, what) for v in value]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{what} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{what} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise ConfigError(f"{what} must be a number, got {value!r}") from None
        else:
            raise ConfigError(f"{what} must be a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"{what} must be a finite number, got {value!r}")
        return out
    if hint is str:
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise ConfigError(f"{what} must be a string, got {value!r}")
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{what} must be {hint.__name__}, got {value!r}")
    return value


def require(cond: bool, message: str) -> None:
    """``validate`` helper: ``require(x > 0, "option 'x' must be > 0, got ...")``."""
    if not cond:
        raise ValueError(message)
