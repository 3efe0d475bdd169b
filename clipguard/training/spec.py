"""One typed description of a run, whatever front end asked for it.

``clipguard train``/``finetune`` flags, ``--preset`` YAML files and bench entries all resolve
into a :class:`RunSpec` through :func:`resolve_spec`, with one precedence rule:

    library defaults < the model's fine-tuning recipe (fine-tuning) < base < preset < each later layer

so a default lives in one place (the options dataclasses, and for fine-tuning
:mod:`clipguard.training.recipes`), and the fingerprint of a run hashes the *resolved* settings:
writing a default out explicitly does not change it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from clipguard.errors import ConfigError, yaml_problem
from clipguard.options import Options
from clipguard.training.recipes import finetune_recipe
from clipguard.training.trainer import TrainConfig

Stage = Literal["pretrain", "finetune"]
STAGES: tuple[str, ...] = ("pretrain", "finetune")
DEFAULT_DEFENSE: dict[str, str] = {"pretrain": "none", "finetune": "ft"}
PRESET_KEYS = ("defense", "options", "train", "description")


@dataclass
class RunSpec:
    """What a run is: a stage, a defence with validated options, and the trainer's settings."""

    stage: str
    defense: str
    options: Options
    train: TrainConfig
    preset: str | None = None

    def build_strategy(self):
        from clipguard import defenses

        return defenses.build(self.defense, self.options)

    def resolved(self) -> dict[str, Any]:
        """Everything that decides the trained weights, defaults filled in."""
        return {"stage": self.stage, "defense": self.defense, "options": self.options.identity(),
                "train": self.train.result_settings()}

    def fingerprint(self) -> str:
        return fingerprint(self.resolved())


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- presets and options
def load_preset(path: str | Path) -> dict[str, Any]:
    """A YAML preset: ``defense: NAME``, ``options: {...}``, ``train: {...}`` (and a description)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preset not found: {path}")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid YAML file: {yaml_problem(e)}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a preset is a mapping with keys {', '.join(PRESET_KEYS)}")
    bad = sorted(str(k) for k in obj if k not in PRESET_KEYS)
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {bad}; a preset has {', '.join(PRESET_KEYS)}")
    for key in ("options", "train"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping, got {type(obj[key]).__name__}")
    if obj.get("defense") is not None and not isinstance(obj["defense"], str):
        raise ConfigError(f"{path}: 'defense' must be a defence name")
    return obj


def parse_options(pairs: list[str], flag: str = "--opt") -> dict[str, Any]:
    """``key=value`` strings; values read as YAML scalars (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"{flag} {p!r} must look like key=value")
        k, v = p.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip().replace("-", "_")] = v  # the type check names the option if a string won't do
    return out


# ---------------------------------------------------------------------------- resolution
def resolve_spec(*, stage: str = "pretrain", defense: str | None = None,
                 preset: str | Path | dict[str, Any] | None = None, options: dict[str, Any] | None = None,
                 base: dict[str, Any] | None = None, train: list[dict[str, Any]] | dict[str, Any] | None = None,
                 where: str = "") -> RunSpec:
    """Merge every layer into a validated RunSpec; errors name ``where`` and the bad key.

    ``base`` sits below the preset (a bench grid's model, device and seed); ``train`` layers sit
    above it, later ones winning (a stage's settings, then an entry's, then command-line flags).
    """
    from clipguard import defenses

    prefix = f"{where}: " if where else ""
    if stage not in STAGES:
        raise ConfigError(f"{prefix}stage must be one of {STAGES}, got {stage!r}")
    preset_name = None
    if isinstance(preset, (str, Path)):
        preset_name = str(preset)
        preset = load_preset(preset)
    preset = preset or {}
    pdef = preset.get("defense")
    if defense is not None and pdef is not None and defense != pdef:
        raise ConfigError(f"{prefix}the preset {preset_name or ''} is for defense "
                          f"'{pdef}', but defense '{defense}' was asked for")
    name = defense or pdef or DEFAULT_DEFENSE[stage]
    try:
        defenses.get(name)  # an unknown name fails here, listing the known ones
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    where_opt = where or (f"preset {preset_name}" if preset_name else "")
    merged_options = {**(preset.get("options") or {}), **(options or {})}
    opts = defenses.resolve_options(name, merged_options, where=where_opt)
    layers = [base or {}, preset.get("train") or {}]
    layers += [train] if isinstance(train, dict) else list(train or [])
    values: dict[str, Any] = {}
    for layer in layers:
        values.update({k: v for k, v in layer.items() if v is not None})
    if stage == "finetune":  # the lowest layer; it depends on the model, which any layer may name
        values = {**finetune_recipe(values.get("model", TrainConfig.model), name), **values}
    cfg = TrainConfig.from_dict(values, where=where)
    return RunSpec(stage=stage, defense=name, options=opts, train=cfg, preset=preset_name)
