"""Canaries: backdoors the defender plants to measure what a fine-tuning recipe removes.

The defender cannot measure how much of an unknown backdoor a recipe removes, but can measure how
much of a backdoor of their own it removes. A canary is such a backdoor: a known trigger poisoned
into a copy of the clean fine-tuning pairs towards a class drawn at random, implanted into the
model to be cleaned by plain fine-tuning, then cleaned away by the recipe under test. What is left
of the canaries (their ASR@1 on the clean validation rows) ranks recipes the way the real attacks
did on validation data where the distance the model moved did not (docs/finetuning.md,
"A backdoor of your own as the yardstick"). The canaries never touch the model the defender
keeps: ``clipguard finetune --lr-search ... --select canary`` cleans the real model in separate
runs and keeps one of those.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipguard.errors import ConfigError

# The defender's two canaries: a BadNet patch and a Blended pattern (alpha 0.2), each with its own
# trigger seed, which also draws its target class.
DEFAULT_CANARIES: tuple[tuple[str, dict[str, Any]], ...] = (("badnet", {}), ("blended", {"alpha": 0.2}))
DEFAULT_TRIGGER_SEEDS: tuple[int, ...] = (9003, 9004)


@dataclass(frozen=True)
class CanaryOptions:
    """How the canaries are planted and implanted (the defaults are the measured ones)."""

    attacks: tuple[tuple[str, dict[str, Any]], ...] = DEFAULT_CANARIES
    trigger_seeds: tuple[int, ...] = DEFAULT_TRIGGER_SEEDS
    # poisoned pairs per canary as a fraction of the clean pairs: 100 of 2,000 implanted both
    # canaries (98% and 93% ASR@1) on cg-nano
    fraction: float = 0.05
    implant_lr: float | None = None       # None: the model's recipe, implant_recipe()
    implant_epochs: int = 10
    min_asr: float = 50.0                 # ASR@1 (%) each canary must reach, or the yardstick is void
    seed: int | None = None               # which rows carry the canaries (None: the run's seed)

    def __post_init__(self) -> None:
        if len(self.attacks) != len(self.trigger_seeds) or not self.attacks:
            raise ConfigError(f"canaries: {len(self.attacks)} attacks but {len(self.trigger_seeds)} trigger seeds")
        if not 0 < self.fraction < 1:
            raise ConfigError(f"canaries: fraction must be in (0, 1), got {self.fraction}")
        if self.implant_lr is not None and self.implant_lr <= 0:
            raise ConfigError(f"--canary-lr must be positive, got {self.implant_lr}")
        if self.implant_epochs < 1:
            raise ConfigError(f"canaries: implant_epochs must be >= 1, got {self.implant_epochs}")
        if not 0 <= self.min_asr <= 100:
            raise ConfigError(f"canaries: min_asr is a percentage, got {self.min_asr}")

    def count(self, n_clean: int) -> int:
        """Poisoned pairs per canary for a clean set of ``n_clean`` pairs (at least one)."""
        return max(1, round(self.fraction * n_clean))


def implant_recipe(model: str) -> dict[str, Any]:
    """Plain fine-tuning settings that implant the canaries into ``model``.

    clipguard's small models: lr 1e-3 for 10 epochs, the setting measured to implant both
    canaries. Other architectures: ten times CleanCLIP's fine-tuning lr (1e-4), untested at scale;
    ``--canary-lr`` overrides it, and a canary that does not take is reported, never used."""
    from clipguard.training.recipes import SMALL_MODELS, finetune_recipe

    base = finetune_recipe(model, "ft")
    return {**base, "lr": 1e-3 if model in SMALL_MODELS else 10 * base["lr"]}


def canary_targets(class_names: list[str], seeds: tuple[int, ...] | list[int]) -> list[str]:
    """Each canary's target class, drawn by ``random.Random(seed)``; no two canaries share one."""
    if len(class_names) < len(seeds) + 1:
        raise ConfigError(f"canaries need more classes than canaries ({len(seeds)}); the classes file has "
                          f"{len(class_names)}")
    targets: list[str] = []
    for s in seeds:
        rng = random.Random(s)
        pick = rng.choice(class_names)
        while pick in targets:
            pick = rng.choice([c for c in class_names if c not in targets])
        targets.append(pick)
    return targets


def plant(clean: str | Path, eval_data: str | Path, classes: str | Path, folder: Path, spec,
          opts: CanaryOptions, limit: int | None = None) -> list[Path]:
    """Poison the clean pairs (the first ``limit`` of them, as the runs read them) with every
    canary, one after the other, into ``folder/<attack>/``.

    Returns the poisoned folders (the last one's train.csv holds every canary); folders already
    there are reused, so a search can be resumed."""
    from clipguard.attacks import poison_csv
    from clipguard.data.classes import ClassInfo
    from clipguard.data.csv_dataset import read_rows, write_csv

    names = list(ClassInfo.load(Path(classes)).classes)
    targets = canary_targets(names, opts.trigger_seeds)
    source, dirs = Path(clean), []
    header, rows = read_rows(source, spec)
    # the poisoned copies point back at the user's images, outside their own folder
    spec = replace(spec, allow_outside_root=True)
    if limit is not None and limit < len(rows):  # the rows the runs read, their images by absolute path
        root = source.parent
        rows = [{**r, spec.img_key: str((root / r[spec.img_key].strip()).resolve())} for r in rows[:limit]]
        source = folder / "clean.csv"
        if not source.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_csv(source, rows, header, spec.separator)
    n = opts.count(len(rows))
    for (attack, options), trig, target in zip(opts.attacks, opts.trigger_seeds, targets):
        d = folder / attack
        if not (d / "manifest.json").is_file():
            poison_csv(source, attack, target=target, count=n, seed=opts.seed or 0, out=d, eval_csv=eval_data,
                       options=dict(options), spec=spec, classes=classes, trigger_seed=trig)
        dirs.append(d)
        source = d / "train.csv"
    return dirs


def canary_asr(model, model_name: str, folders: list[Path], device: str = "cpu") -> list[float]:
    """ASR@1 (in %) of every canary on its held-out triggered rows, zero-shot."""
    from clipguard.attacks.manifest import load_manifest
    from clipguard.evaluation.asr import asr_for_model

    out = []
    for d in folders:
        res = asr_for_model(model, model_name, load_manifest(d / "manifest.json"), device)
        out.append(round(100 * float(res["zeroshot"]["asr@1"]), 2))
    return out
