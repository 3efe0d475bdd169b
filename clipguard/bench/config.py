"""The benchmark grid as a YAML file, validated up front so a typo fails before hours of training.

A grid is datasets x attacks x defences (pre-training, then fine-tuning of a poisoned model) x
seeds. Every error names the config file and the key that is wrong.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipguard.errors import ConfigError, yaml_problem

# a grid's stages and entries may set these TrainConfig fields (model, device and seed are the
# grid's; checkpoint: pre-training that starts from given weights)
TRAIN_KEYS = {"epochs", "batch_size", "lr", "min_lr", "warmup", "weight_decay", "grad_clip",
              "accum_steps", "precision", "checkpoint"}
NO_ATTACK = ("none", "clean")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_UNSET_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


@dataclass
class DatasetSpec:
    """Either a built-in dataset (materialised once into the bench folder) or user CSVs."""

    label: str
    builtin: str | None = None
    train: str | None = None
    test: str | None = None
    classes: str | None = None
    probe: str | None = None  # labelled CSV for the linear probe (default: clean training rows)
    finetune: str | None = None  # clean CSV for fine-tuning defences (default: clean training rows)
    lazy: bool = False  # decode images on demand (datasets larger than memory)
    train_size: int | None = None
    test_size: int | None = None
    data_seed: int = 0
    probe_size: int = 2000
    finetune_size: int = 2000
    val_size: int = 0  # clean labelled rows held out of training for choosing settings (split: val)
    separator: str = "\t"
    img_key: str = "filepath"
    caption_key: str = "title"
    label_key: str = "label"


@dataclass
class AttackPart:
    """One call of ``clipguard.attacks.poison_csv``."""

    attack: str
    # a class (name or index), or a list of them: seed s then poisons towards target[s % len], so
    # a column measured over several seeds covers several classes instead of one class's luck
    target: str | int | list[str | int] | None = None
    rate: float | None = None
    count: int | None = None
    mode: str = "inject"
    options: dict[str, Any] = field(default_factory=dict)

    def target_for(self, seed: int) -> str | int | None:
        """The target class this part poisons towards in the run with ``seed``."""
        if isinstance(self.target, list):
            return self.target[seed % len(self.target)]
        return self.target


@dataclass
class AttackSpec:
    """A column of the ASR table. Several parts poison ONE dataset together (cheaper grids);
    their ASRs are still measured and reported separately, one column per part."""

    label: str
    parts: list[AttackPart] = field(default_factory=list)
    defenses: list[str] | None = None  # pre-training defences run on this data (None: all)
    seeds: list[int] | None = None  # the grid's seeds this attack runs with (None: all)

    def runs(self, defense_label: str) -> bool:
        return self.defenses is None or defense_label in self.defenses

    def runs_seed(self, seed: int) -> bool:
        return self.seeds is None or seed in self.seeds

    @property
    def clean(self) -> bool:
        return not self.parts


@dataclass
class DetectSpec:
    """Detect-then-train: score the poisoned training set with ``detector`` on the final model of
    the pre-training entry ``base`` (same dataset, attack and seed), drop what the detector's keep
    rule (or ``keep_fraction``) rejects, and train the entry's defence on the kept pairs."""

    detector: str
    base: str | None = None  # a pre-training label; None until parse_config fills in the default
    options: dict[str, Any] = field(default_factory=dict)
    # further models that score the same pairs (``base: [A, B]`` in YAML): each detector's score
    # is then the mean of its rank shares under every model (clipguard.detection.combine_results)
    more_bases: list[str] = field(default_factory=list)
    # with several bases: "mean" or "max" of the rank shares (clipguard.detection.runner.COMBINE_RULES)
    combine: str = "mean"
    keep_fraction: float | None = None  # keep this fraction of lowest scores instead of the rule
    # veto detectors (name -> options): the pairs each one's own rule rejects are dropped too
    veto: dict[str, dict[str, Any]] = field(default_factory=dict)
    # None: the dropped pairs are left out. K: each dropped image is trained with a caption borrowed
    # from the K kept pairs with the nearest images (clipguard.detection.relabel)
    relabel: int | None = None
    # the model a detector that compares with a reference reads (``shift``): a pre-training label
    reference: str | None = None
    # another detect-then-train entry whose dropped pairs are dropped here too: the cell trains on
    # the pairs both screens keep (a second pass that must not let back what the first dropped)
    within: str | None = None

    def upstream(self) -> list[str]:
        """Every label whose model or detection this entry waits for: its bases, its reference and
        the entry it keeps ``within``."""
        return [self.base, *self.more_bases, *([self.reference] if self.reference else []),
                *([self.within] if self.within else [])]


TRAIN_DATA = ("train", "held-aside")


@dataclass
class DefenseSpec:
    """A grid entry: a defence by name or by preset, plus option and train overrides."""

    label: str
    defense: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # a preset YAML (path relative to the grid file, or a name in configs/)
    detect: DetectSpec | None = None  # pre-training only: train on the pairs a detector keeps
    # pre-training only: what the entry trains on. "train": the grid's (poisoned) training set;
    # "held-aside": the dataset's held-aside clean rows (finetune_size of them), a defender's small
    # trusted set: a model to scan the data with (scan/detect base), not a defence of its own
    data: str = "train"


@dataclass
class ScanSpec:
    """Scan-only: every detector on the final model of each ``bases`` entry, per dataset, poisoned
    attack and seed; detection metrics only, nothing trains."""

    bases: list[str] = field(default_factory=list)
    detectors: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the model the detectors that compare with a reference read (``shift``); in the cells of that
    # base itself they do not run
    reference: str | None = None


@dataclass
class StageSpec:
    train: dict[str, Any] = field(default_factory=dict)
    defenses: list[DefenseSpec] = field(default_factory=list)
    base: str | None = None  # fine-tuning only: label of the pre-training defence it starts from
    data: str = "clean"  # fine-tuning only: 'clean' (a held-aside clean subset) or 'poisoned'


@dataclass
class BenchConfig:
    name: str
    model: str
    device: str
    seeds: list[int]
    datasets: list[DatasetSpec]
    attacks: list[AttackSpec]
    pretrain: StageSpec
    finetune: StageSpec | None
    scan: ScanSpec | None = None  # scan-only cells (detection metrics of the base models)
    split: str = "test"  # evaluate on the test split, or on each dataset's held-out validation rows
    histogram_bins: int = 40
    histogram_max_pairs: int = 20000
    # zero-shot on the grid's evaluation rows after every training epoch (results.jsonl): how a run
    # gets where it ends; it does not change what a cell trains, so it is not in the fingerprint
    epoch_zeroshot: bool = False
    # the text tower on the captions without their padding (TrainConfig.trim_text; None: on a GPU
    # only). The same features up to float rounding, so not in the fingerprint either
    trim_text: bool | None = None
    # how every scan of the grid (scan-only and detect-then-train cells) finds neighbours: the
    # NeighbourSearch fields given (empty: exact, as the cells made before it existed)
    neighbour_search: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: list[str] | None = None) -> BenchConfig:
    """Read YAML, apply ``key.sub=value`` overrides, expand ``${ENV}`` and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a bench config is a mapping (datasets, attacks, pretrain, ...)")
    for item in overrides or []:
        apply_override(raw, item, str(path))
    raw = _expand_env(raw, str(path), [])
    return parse_config(raw, source=str(path), base_dir=path.parent)


def apply_override(raw: dict[str, Any], item: str, where: str = "--set") -> None:
    """``datasets.cc3m.train=/data/cc3m.csv``: the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: override {item!r}: '{p}' is not a mapping")
        node = nxt
    node[parts[-1]] = yaml.safe_load(value)


def _expand_env(obj: Any, source: str, where: list[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _expand_env(v, source, where + [str(k)]) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand_env(v, source, where + [str(i)]) for i, v in enumerate(obj)]
    if isinstance(obj, str) and "$" in obj:
        out = os.path.expandvars(obj)
        left = _UNSET_VAR.search(out)
        if left:
            raise ConfigError(f"{source}: {'.'.join(where)}: environment variable {left.group(1)} is not "
                              f"set (set it, or pass --set {'.'.join(where)}=VALUE)")
        return out
    return obj


# ---------------------------------------------------------------------------- parsing
def _mapping(obj: Any, source: str, key: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(obj).__name__}")
    return obj


def _check_keys(obj: dict[str, Any], allowed: set[str], source: str, key: str) -> None:
    bad = sorted(set(obj) - allowed)
    if bad:
        raise ConfigError(f"{source}: '{key}' has unknown key(s) {bad}; allowed: {sorted(allowed)}")


def _label(name: Any, source: str, key: str) -> str:
    name = str(name)
    if not _LABEL.match(name):
        raise ConfigError(f"{source}: '{key}': label {name!r} must be letters, digits, '_', '.', '+', '-'")
    return name


def _train(obj: Any, source: str, key: str) -> dict[str, Any]:
    t = _mapping(obj, source, key)
    _check_keys(t, TRAIN_KEYS, source, key)
    return dict(t)


def _seeds(obj: Any, source: str) -> list[int]:
    if isinstance(obj, int) and not isinstance(obj, bool):
        return [obj]
    if isinstance(obj, list) and obj and all(isinstance(s, int) and not isinstance(s, bool) for s in obj):
        if len(set(obj)) != len(obj):
            raise ConfigError(f"{source}: 'seeds' has duplicates: {obj}")
        return list(obj)
    raise ConfigError(f"{source}: 'seeds' must be an integer or a non-empty list of integers, got {obj!r}")


def _resolve(p: Any, base_dir: Path | None) -> str:
    p = Path(os.path.expanduser(str(p)))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


def _dataset(label: str, obj: Any, source: str, base_dir: Path | None) -> DatasetSpec:
    key = f"datasets.{label}"
    d = _mapping(obj, source, key)
    paths = ("train", "test", "classes", "probe", "finetune")
    _check_keys(d, {"builtin", "train_size", "test_size", "data_seed", "probe_size", "finetune_size", "val_size", "lazy",
                    "separator", "img_key", "caption_key", "label_key", *paths}, source, key)
    spec = DatasetSpec(label=label, **{k: v for k, v in d.items() if k not in paths})
    for k in ("probe", "finetune"):
        if d.get(k):
            setattr(spec, k, _resolve(d[k], base_dir))
    if spec.builtin is not None:
        from clipguard.data import builtin

        if spec.builtin not in builtin.names():
            raise ConfigError(f"{source}: {key}.builtin: unknown dataset {spec.builtin!r}; "
                              f"built in: {builtin.names()}")
        if any(d.get(k) for k in ("train", "test")):
            raise ConfigError(f"{source}: {key}: give either 'builtin' or 'train'/'test' CSVs, not both")
    else:
        for k in ("train", "test"):
            if not d.get(k):
                raise ConfigError(f"{source}: {key}: needs '{k}' (a CSV path) or 'builtin'")
        spec.train = _resolve(d["train"], base_dir)
        spec.test = _resolve(d["test"], base_dir)
        spec.classes = _resolve(d["classes"], base_dir) if d.get("classes") else str(
            Path(spec.test).parent / "classes.json")
    for k in ("probe_size", "finetune_size", "val_size"):
        v = getattr(spec, k)
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"{source}: {key}.{k} must be a non-negative integer, got {v!r}")
    return spec


def _attack_part(obj: Any, source: str, key: str) -> AttackPart:
    a = _mapping(obj, source, key)
    _check_keys(a, {"attack", "target", "rate", "count", "mode", "options"}, source, key)
    if not a.get("attack"):
        raise ConfigError(f"{source}: {key}: needs 'attack' (a registered attack name)")
    if (a.get("rate") is None) == (a.get("count") is None):
        raise ConfigError(f"{source}: {key}: give exactly one of 'rate' or 'count'")
    target = a.get("target")
    if target is None:
        raise ConfigError(f"{source}: {key}: needs 'target' (a class name or index)")
    def is_class(t: Any) -> bool:
        return isinstance(t, (str, int)) and not isinstance(t, bool)

    if isinstance(target, list):
        if not target or not all(is_class(t) for t in target):
            raise ConfigError(f"{source}: {key}.target: a list of targets must be a non-empty list of class "
                              f"names or indices (seed s uses item s % length), got {target!r}")
    elif not is_class(target):
        raise ConfigError(f"{source}: {key}.target must be a class name or index, or a list of them, "
                          f"got {target!r}")
    if a.get("mode", "inject") not in ("inject", "replace"):
        raise ConfigError(f"{source}: {key}.mode must be 'inject' or 'replace'")
    return AttackPart(attack=str(a["attack"]), target=target, rate=a.get("rate"),
                      count=a.get("count"), mode=a.get("mode", "inject"),
                      options=dict(_mapping(a.get("options"), source, f"{key}.options")))


def _attack(label: str, obj: Any, source: str) -> AttackSpec:
    """An attack entry; ``defenses: [labels]`` restricts the pre-training defences run on it (e.g.
    only the undefended CLIP on the clean data that gives the base rate) and ``seeds: [..]`` the
    grid's seeds (e.g. one seed for that base rate when time is short)."""
    key = f"attacks.{label}"
    only = seeds = None
    if isinstance(obj, dict) and ("defenses" in obj or "seeds" in obj):
        obj = dict(obj)
        only = obj.pop("defenses", None)
        if only is not None and (
                not isinstance(only, list) or not only or not all(isinstance(x, str) for x in only)):
            raise ConfigError(f"{source}: {key}.defenses must be a non-empty list of pretrain defence labels")
        if "seeds" in obj:
            seeds = _seeds(obj.pop("seeds"), f"{source}: {key}")
    kw = {"defenses": only, "seeds": seeds}
    if obj is None or (isinstance(obj, dict) and obj.get("attack") in NO_ATTACK) or obj in NO_ATTACK:
        if isinstance(obj, dict):
            _check_keys(obj, {"attack"}, source, key)
        return AttackSpec(label=label, parts=[], **kw)
    if isinstance(obj, dict) and "parts" in obj:
        _check_keys(obj, {"parts"}, source, key)
        parts = obj["parts"]
        if not isinstance(parts, list) or not parts:
            raise ConfigError(f"{source}: {key}.parts must be a non-empty list of attacks")
        return AttackSpec(label=label, parts=[_attack_part(p, source, f"{key}.parts.{i}")
                                              for i, p in enumerate(parts)], **kw)
    return AttackSpec(label=label, parts=[_attack_part(obj, source, key)], **kw)


def _defense(label: str, obj: Any, source: str, key: str, base_dir: Path | None,
             detect: bool = False) -> DefenseSpec:
    if isinstance(obj, str):
        return DefenseSpec(label=label, defense=obj)
    d = _mapping(obj, source, key)
    _check_keys(d, {"defense", "preset", "options", "train"} | ({"detect", "data"} if detect else set()), source, key)
    data = str(d.get("data", "train"))
    if data not in TRAIN_DATA:
        raise ConfigError(f"{source}: {key}.data must be one of {', '.join(TRAIN_DATA)}, got {data!r}")
    if data != "train" and d.get("detect") is not None:
        raise ConfigError(f"{source}: {key}: 'data: {data}' and 'detect' do not combine (detect-then-train "
                          f"drops pairs of the training set)")
    preset = _preset_path(d["preset"], base_dir, source, key) if d.get("preset") else None
    det = _detect(d["detect"], source, f"{key}.detect") if d.get("detect") is not None else None
    defense = d.get("defense")
    if defense is None and preset is None:
        defense = "none" if det is not None else label
    if defense is None:
        from clipguard.training.spec import load_preset

        defense = load_preset(preset).get("defense") or label
    return DefenseSpec(label=label, defense=str(defense), preset=preset,
                       options=dict(_mapping(d.get("options"), source, f"{key}.options")),
                       train=_train(d.get("train"), source, f"{key}.train"), detect=det, data=data)


def _detector_name(name: Any, source: str, key: str) -> str:
    from clipguard.detection.base import get

    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: {key}: needs a detector name of `clipguard scan`, got {name!r}")
    try:
        get(name)
    except ConfigError as e:
        raise ConfigError(f"{source}: {key}: {e}") from None
    return name


def _detector_options(name: str, options: Any, source: str, key: str) -> dict[str, Any]:
    """Check a detector's options now (a typo fails before any training)."""
    from clipguard.detection.base import build

    opts = dict(_mapping(options, source, key))
    try:
        build(name, opts, where=f"{source}: {key}")
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {key}: {msg}") from None
    return opts


def _detect(obj: Any, source: str, key: str) -> DetectSpec:
    """``detect: {detector: dao, base: CLIP, options: {k: 16}, keep_fraction: null,
    veto: {repeat: {z: 4}}, relabel: null, within: null}`` (``veto`` may also be a list of names;
    with ``base: [A, B]``, ``combine: mean | max``)."""
    d = _mapping(obj, source, key)
    _check_keys(d, {"detector", "base", "options", "keep_fraction", "veto", "relabel", "combine", "reference",
                    "within"}, source, key)
    if d.get("detector") is None:
        raise ConfigError(f"{source}: {key}: needs 'detector' (a detector name of `clipguard scan`)")
    name = _detector_name(d["detector"], source, f"{key}.detector")
    frac = d.get("keep_fraction")
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float))
                             or not 0.0 < float(frac) <= 1.0):
        raise ConfigError(f"{source}: {key}.keep_fraction must be null or a number in (0, 1], got {frac!r}")
    base = d.get("base")
    more: list[str] = []
    if isinstance(base, list):
        if not base or not all(isinstance(b, str) for b in base) or len(set(base)) != len(base):
            raise ConfigError(f"{source}: {key}.base must be a label or a list of distinct labels, got {base!r}")
        base, more = base[0], list(base[1:])
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{source}: {key}.base must be a pre-training defence label, got {base!r}")
    from clipguard.detection.runner import COMBINE_RULES

    combine = d.get("combine", "mean")
    if combine not in COMBINE_RULES:
        raise ConfigError(f"{source}: {key}.combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")
    if "combine" in d and not more:
        raise ConfigError(f"{source}: {key}.combine combines the scores of several models; it needs base: [A, B]")
    raw = d.get("veto") or {}
    if isinstance(raw, list):
        raw = {v: {} for v in raw}
    raw = _mapping(raw, source, f"{key}.veto")
    veto: dict[str, dict[str, Any]] = {}
    for v, opts in raw.items():
        vname = _detector_name(v, source, f"{key}.veto")
        if vname == name:
            raise ConfigError(f"{source}: {key}.veto: '{vname}' is the entry's detector; a veto must be another")
        veto[vname] = _detector_options(vname, opts, source, f"{key}.veto.{vname}")
    relabel = d.get("relabel")
    if relabel is not None and (isinstance(relabel, bool) or not isinstance(relabel, int) or relabel < 1):
        raise ConfigError(f"{source}: {key}.relabel must be null (drop the rejected pairs) or a whole number "
                          f">= 1 (the kept neighbours a rejected image borrows its caption from), got {relabel!r}")
    reference = d.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise ConfigError(f"{source}: {key}.reference must be a pre-training defence label, got {reference!r}")
    within = d.get("within")
    if within is not None and not isinstance(within, str):
        raise ConfigError(f"{source}: {key}.within must be a detect-then-train entry's label, got {within!r}")
    if within is not None and relabel is not None:
        raise ConfigError(f"{source}: {key}: within and relabel cannot be combined (the other entry's dropped "
                          f"pairs would need captions to borrow)")
    options = _detector_options(name, d.get("options"), source, f"{key}.options")
    _check_reference([name, *veto], {name: options, **veto}, reference, source, key)
    return DetectSpec(detector=name, base=base, more_bases=more, combine=combine, options=options,
                      keep_fraction=None if frac is None else float(frac), veto=veto, relabel=relabel,
                      reference=reference, within=within)


def _check_reference(detectors: list[str], options: dict[str, dict[str, Any]], reference: str | None,
                     source: str, key: str) -> None:
    """A detector that compares with a reference model (with its ``options``) needs ``reference``;
    a ``reference`` that no detector reads is refused too (it would make the cell wait for a model
    it never uses)."""
    from clipguard.detection.base import needs_reference

    needing = [n for n in detectors if needs_reference(n, options.get(n))]
    if needing and reference is None:
        raise ConfigError(f"{source}: {key}: detector '{needing[0]}' compares the scanned model with a reference "
                          f"model; give {key}.reference (a pre-training label, e.g. a model trained on trusted data)")
    if reference is not None and not needing:
        raise ConfigError(f"{source}: {key}.reference: none of {detectors} compares with a reference model")


def _default_base(pretrain: StageSpec) -> str | None:
    """The base a detector scans with when none is named: the first plain CLIP entry (the model
    trained on the poisoned data itself, the protocol of the ICLR 2025 detection paper)."""
    return next((d.label for d in pretrain.defenses
                 if d.detect is None and d.defense == "none" and d.preset is None), None)


def finetune_methods(finetune: StageSpec | None) -> list[str]:
    """The row labels of the fine-tuning stage's models, 'BASE+ENTRY' (the model ENTRY made from
    the pre-training entry BASE's model): a detect or scan base may name one of them."""
    if finetune is None:
        return []
    return [f"{finetune.base}+{d.label}" for d in finetune.defenses]


def model_runs(attack: AttackSpec, label: str, finetune: StageSpec | None) -> bool:
    """Whether the grid makes the model ``label`` (a pre-training label or a fine-tuning row) for
    ``attack``: a fine-tuning model only where its base runs and there is a backdoor to remove."""
    if label in finetune_methods(finetune):
        return not attack.clean and attack.runs(finetune.base)
    return attack.runs(label)


def _check_base(base: str | None, pretrain: StageSpec, source: str, key: str, chain: bool = False,
                finetune: StageSpec | None = None) -> str:
    """``base`` (or the default) checked against the pre-training labels and the fine-tuning rows
    (``BASE+ENTRY``: the model a fine-tuning defence cleaned, scoring the poisoned data it never
    saw as it is). ``chain``: the base may itself be a detect-then-train entry (a detect entry
    scanning with a model trained on pairs an earlier detection kept)."""
    labels = [d.label for d in pretrain.defenses]
    if base is None:
        base = _default_base(pretrain)
        if base is None:
            raise ConfigError(f"{source}: {key}: needs 'base' (the pre-training defence label whose model scores "
                              f"the data); there is no plain CLIP entry (defense: none) to default to; "
                              f"choose one of {labels}")
    if base in finetune_methods(finetune):
        return base
    if base not in labels:
        raise ConfigError(f"{source}: {key}: base {base!r} is not a pre-training defence label or a fine-tuning "
                          f"row; choose one of {labels + finetune_methods(finetune)}")
    entry = next(d for d in pretrain.defenses if d.label == base)
    if entry.detect is not None and not chain:
        raise ConfigError(f"{source}: {key}: base {base!r} is itself a detect-then-train entry; the base must "
                          f"train on the poisoned data as it is")
    return base


def detect_depth(defenses: list[DefenseSpec], label: str, source: str = "config",
                 finetune: StageSpec | None = None, _stack: tuple[str, ...] = ()) -> int:
    """How many models must be made, one after the other, before ``label``'s: 0 for an entry that
    trains on the data as it is, one more for each detect base or fine-tuning base on the longest
    way (a cycle is an error). ``label`` may be a fine-tuning row ('BASE+ENTRY')."""
    if label in _stack:
        chain = " -> ".join([*_stack[_stack.index(label):], label])
        raise ConfigError(f"{source}: detect bases form a cycle: {chain}")
    tuned = set(finetune_methods(finetune))
    if label in tuned:
        parents = [finetune.base]
    else:
        spec = next(d for d in defenses if d.label == label).detect
        parents = [] if spec is None else spec.upstream()
    if not parents:
        return 0
    return 1 + max(detect_depth(defenses, p, source, finetune, (*_stack, label)) for p in parents)


def _scan(obj: Any, source: str, pretrain: StageSpec, finetune: StageSpec | None = None) -> ScanSpec:
    """``scan: {base: CLIP, detectors: [dao, kdist], options: {dao: {k: 16}}}``."""
    s = _mapping(obj, source, "scan")
    _check_keys(s, {"base", "detectors", "options", "reference"}, source, "scan")
    raw_bases = s.get("base")
    bases = raw_bases if isinstance(raw_bases, list) else [raw_bases]
    if not bases or not all(b is None or isinstance(b, str) for b in bases):
        raise ConfigError(f"{source}: scan.base must be a pre-training defence label or fine-tuning row, or a list of them, "
                          f"got {raw_bases!r}")
    bases = [_check_base(b, pretrain, source, "scan.base", chain=True, finetune=finetune) for b in bases]
    if len(set(bases)) != len(bases):
        raise ConfigError(f"{source}: scan.base has duplicates: {bases}")
    reference = s.get("reference")
    if reference is not None:
        reference = _check_base(reference, pretrain, source, "scan.reference", chain=True, finetune=finetune)
    dets = s.get("detectors")
    if dets is None:
        from clipguard.detection.base import default_detectors

        dets = default_detectors(reference is not None)
    elif isinstance(dets, str):
        dets = [x.strip() for x in dets.split(",") if x.strip()]
    if not isinstance(dets, list) or not dets or not all(isinstance(x, str) for x in dets):
        raise ConfigError(f"{source}: scan.detectors must be a non-empty list of detector names, got {dets!r}")
    if len(set(dets)) != len(dets):
        raise ConfigError(f"{source}: scan.detectors has duplicates: {dets}")
    dets = [_detector_name(x, source, f"scan.detectors.{i}") for i, x in enumerate(dets)]
    options = _mapping(s.get("options"), source, "scan.options")
    extra = sorted(set(options) - set(dets))
    if extra:
        raise ConfigError(f"{source}: scan.options: {extra} are not among scan.detectors {dets}")
    checked = {n: _detector_options(n, options.get(n), source, f"scan.options.{n}") for n in dets}
    _check_reference(dets, checked, reference, source, "scan")
    return ScanSpec(bases=bases, detectors=list(dets), reference=reference, options=checked)


def _preset_path(name: Any, base_dir: Path | None, source: str, key: str) -> str:
    """A preset next to the grid file, or one of the presets shipped in configs/."""
    p = Path(os.path.expanduser(str(name)))
    here = base_dir or Path.cwd()
    cands = [p] if p.is_absolute() else [here / p, here / f"{p}.yaml", Path.cwd() / p,
                                         Path.cwd() / "configs" / p, Path.cwd() / "configs" / f"{p}.yaml"]
    for c in cands:
        if c.is_file():
            return str(c)
    raise ConfigError(f"{source}: {key}.preset: {name!r} not found (looked in {', '.join(str(c.parent) for c in cands)})")


def _shared_options(defenses: list[DefenseSpec], shared: Any, source: str, key: str,
                    base_dir: Path | None = None) -> None:
    """``defense_options: {NAME: {option: value}}``: what every entry of defence NAME without a
    preset starts from, under its own options. A grid that recorded earlier rounds pins the
    library defaults it ran with here, so a later change of a default does not change its cells.
    ``preset: P`` among them takes P's options (P must be a preset of defence NAME with no train
    settings), under the other keys: the grids that ran with one set of earlier defaults name one
    file that writes them out, and a later change of a default is pinned there once."""
    table = _mapping(shared, source, key)
    for name, opts in table.items():
        opts = dict(_mapping(opts, source, f"{key}.{name}"))
        if "preset" in opts:
            opts = {**_preset_options(name, opts.pop("preset"), base_dir, source, f"{key}.{name}"), **opts}
        if not any(d.defense == name for d in defenses):
            raise ConfigError(f"{source}: {key}.{name}: no entry of this stage uses defence {name!r}")
        for d in defenses:
            if d.defense == name and d.preset is None:
                d.options = {**opts, **d.options}


def _preset_options(name: str, preset: Any, base_dir: Path | None, source: str, key: str) -> dict[str, Any]:
    """The options of a preset named in ``defense_options``."""
    from clipguard.training.spec import load_preset

    path = _preset_path(preset, base_dir, source, key)
    obj = load_preset(path)
    if obj.get("defense") != name:
        raise ConfigError(f"{source}: {key}.preset: {path} is a preset of defence {obj.get('defense')!r}, not {name!r}")
    if obj.get("train"):
        raise ConfigError(f"{source}: {key}.preset: {path} has train settings; defense_options takes options only "
                          f"(name the preset on the entries to take its train settings too)")
    return dict(obj.get("options") or {})


def _stage(obj: Any, source: str, key: str, finetune: bool, base_dir: Path | None = None) -> StageSpec:
    s = _mapping(obj, source, key)
    allowed = {"train", "defenses", "defense_options"} | ({"base", "data"} if finetune else set())
    _check_keys(s, allowed, source, key)
    defs = _mapping(s.get("defenses"), source, f"{key}.defenses")
    if not defs:
        raise ConfigError(f"{source}: '{key}.defenses' must list at least one defence")
    stage = StageSpec(train=_train(s.get("train"), source, f"{key}.train"),
                      defenses=[_defense(_label(k, source, f"{key}.defenses"), v, source,
                                         f"{key}.defenses.{k}", base_dir, detect=not finetune)
                                for k, v in defs.items()])
    _shared_options(stage.defenses, s.get("defense_options"), source, f"{key}.defense_options", base_dir)
    if finetune:
        stage.base = s.get("base")
        stage.data = s.get("data", "clean")
        if stage.data not in ("clean", "poisoned"):
            raise ConfigError(f"{source}: {key}.data must be 'clean' or 'poisoned'")
    return stage


def parse_config(raw: dict[str, Any], *, source: str = "<config>", base_dir: Path | None = None) -> BenchConfig:
    raw = copy.deepcopy(raw)
    _check_keys(raw, {"name", "model", "device", "seeds", "datasets", "attacks", "pretrain", "finetune",
                      "split", "histogram_bins", "histogram_max_pairs", "description", "scan", "epoch_zeroshot",
                      "trim_text", "neighbour_search"},
                source, "top level")
    for k in ("datasets", "attacks", "pretrain"):
        if not raw.get(k):
            raise ConfigError(f"{source}: missing '{k}'")
    datasets = [_dataset(_label(k, source, "datasets"), v, source, base_dir)
                for k, v in _mapping(raw["datasets"], source, "datasets").items()]
    attacks = [_attack(_label(k, source, "attacks"), v, source)
               for k, v in _mapping(raw["attacks"], source, "attacks").items()]
    pretrain = _stage(raw["pretrain"], source, "pretrain", finetune=False, base_dir=base_dir)
    finetune = (_stage(raw["finetune"], source, "finetune", finetune=True, base_dir=base_dir)
                if raw.get("finetune") else None)
    for a in attacks:
        unknown = sorted(set(a.defenses or []) - {d.label for d in pretrain.defenses})
        if unknown:
            raise ConfigError(f"{source}: attacks.{a.label}.defenses: {unknown} are not pretrain defence labels; "
                              f"choose from {[d.label for d in pretrain.defenses]}")
    if finetune is not None:  # before the detect bases: one may be a fine-tuning row
        labels = [d.label for d in pretrain.defenses]
        if finetune.base is None:
            finetune.base = labels[0]
        if finetune.base not in labels:
            raise ConfigError(f"{source}: finetune.base {finetune.base!r} is not a pre-training defence "
                              f"label; choose one of {labels}")
        clash = {d.label for d in finetune.defenses} & set(labels)
        if clash:
            raise ConfigError(f"{source}: labels {sorted(clash)} are used by both pretrain and finetune")
    for d in pretrain.defenses:
        if d.detect is not None:
            key = f"pretrain.defenses.{d.label}.detect"
            d.detect.base = _check_base(d.detect.base, pretrain, source, key, chain=True, finetune=finetune)
            d.detect.more_bases = [_check_base(b, pretrain, source, key, chain=True, finetune=finetune)
                                   for b in d.detect.more_bases]
            if d.detect.reference is not None:
                d.detect.reference = _check_base(d.detect.reference, pretrain, source, f"{key}.reference",
                                                 chain=True, finetune=finetune)
            within = d.detect.within
            if within is not None:
                entry = next((e for e in pretrain.defenses if e.label == within), None)
                if entry is None or entry.detect is None or within == d.label:
                    others = [e.label for e in pretrain.defenses if e.detect is not None and e.label != d.label]
                    raise ConfigError(f"{source}: {key}.within: {within!r} is not another detect-then-train entry; "
                                      f"choose one of {others}")
            for base in d.detect.upstream():
                for a in attacks:
                    if a.runs(d.label) and not model_runs(a, base, finetune):
                        why = ("a fine-tuning model is made only on poisoned columns that run its base"
                               if base in finetune_methods(finetune) else "list it there too")
                        raise ConfigError(f"{source}: attacks.{a.label} runs {d.label!r} but not the model of its "
                                          f"detect.base {base!r}, which scans the data ({why})")
    for d in pretrain.defenses:
        detect_depth(pretrain.defenses, d.label, source, finetune)  # a chain of bases must end
    scan = _scan(raw["scan"], source, pretrain, finetune) if raw.get("scan") is not None else None
    grid_seeds = _seeds(raw.get("seeds", [0]), source)
    for a in attacks:
        extra = sorted(set(a.seeds or []) - set(grid_seeds))
        if extra:
            raise ConfigError(f"{source}: attacks.{a.label}.seeds: {extra} are not among the grid's seeds {grid_seeds}")
    if scan is not None and scan.reference is not None:
        for a in attacks:
            if not a.clean and any(model_runs(a, b, finetune) for b in scan.bases) \
                    and not model_runs(a, scan.reference, finetune):
                raise ConfigError(f"{source}: attacks.{a.label} runs a scan base but not scan.reference "
                                  f"{scan.reference!r}, whose model the scan compares with; list it there too")
    if finetune is not None and scan is not None and finetune.base in scan.bases \
            and "scan" in {d.label for d in finetune.defenses}:
        raise ConfigError(f"{source}: finetune.defenses.scan would be named '{finetune.base}+scan', "
                          f"the method of the scan-only cells; choose another label")
    cfg = BenchConfig(name=str(raw.get("name") or Path(source).stem), model=str(raw.get("model", "cg-tiny")),
                      device=str(raw.get("device", "cpu")), seeds=grid_seeds,
                      datasets=datasets, attacks=attacks, pretrain=pretrain, finetune=finetune, scan=scan,
                      split=_split(raw.get("split", "test"), source, datasets),
                      histogram_bins=int(raw.get("histogram_bins", 40)),
                      histogram_max_pairs=int(raw.get("histogram_max_pairs", 20000)),
                      epoch_zeroshot=_flag(raw.get("epoch_zeroshot", False), source, "epoch_zeroshot"),
                      trim_text=(None if raw.get("trim_text") is None
                                 else _flag(raw["trim_text"], source, "trim_text")),
                      neighbour_search=_neighbour_search(raw.get("neighbour_search"), source),
                      source=source, raw=raw)
    return cfg


def _neighbour_search(obj: Any, source: str) -> dict[str, Any]:
    """The grid's neighbour-search settings, checked; only those that differ from the defaults,
    so a grid that gives none (or the defaults) keeps its cells' fingerprints."""
    from clipguard.detection.search import NeighbourSearch

    given = NeighbourSearch.from_dict(_mapping(obj, source, "neighbour_search"), where=f"{source}: neighbour_search")
    default = NeighbourSearch().to_dict()
    return {k: v for k, v in given.to_dict().items() if v != default[k]}


def _flag(value: Any, source: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    return value


def _split(value: Any, source: str, datasets: list[DatasetSpec]) -> str:
    if value not in ("test", "val"):
        raise ConfigError(f"{source}: 'split' must be 'test' or 'val', got {value!r}")
    if value == "val":
        missing = [d.label for d in datasets if d.val_size <= 0]
        if missing:
            raise ConfigError(f"{source}: split: val needs val_size > 0 for datasets {missing}")
    return value


def validate_names(cfg: BenchConfig) -> None:
    """Resolve every defence entry (name, preset, options, train settings) and check every attack
    name before anything runs: a misspelt method fails in a second, not an hour."""
    from clipguard.bench.cell import entry_spec

    for stage, label in ((cfg.pretrain, "pretrain"), (cfg.finetune, "finetune")):
        if stage is None:
            continue
        for d in stage.defenses:
            entry_spec(cfg, label, d, seed=cfg.seeds[0])
    parts = [(a.label, p) for a in cfg.attacks for p in a.parts]
    if not parts:
        return
    try:
        from clipguard import attacks
    except ImportError as e:
        raise ConfigError(f"{cfg.source}: the grid has attacks but clipguard.attacks cannot be imported: "
                          f"{e}") from None
    for label, p in parts:
        try:
            attacks.get(p.attack).build(dict(p.options))
        except ConfigError as e:
            raise ConfigError(f"{cfg.source}: attacks.{label}: {e}") from None
