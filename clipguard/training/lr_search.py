"""``clipguard finetune --lr-search``: choose the fine-tuning learning rate by the defender's rule.

A fine-tuning defence removes a backdoor only if it moves the model far enough, and the learning
rate that does so depends on the model and on the clean set. The defender does not know the
trigger, so the choice cannot look at attack success; what they can measure is clean accuracy,
and what is left of a backdoor they planted themselves. The rule (docs/finetuning.md#canaries):

    among the candidate learning rates whose zero-shot accuracy on the clean validation data
    (``--eval-data``) stays within ``budget`` points of the starting model's, take the one that
    leaves least of the canaries (``select="canary"``, the default), or the one that moved the
    validation images farthest (``select="drift"``,
    :func:`clipguard.evaluation.drift.embedding_drift`); if none stays within the budget, the most
    accurate one.

Each candidate is a full run in ``OUT/lr-search/lr-<lr>/`` (resumable like any run); the table and
the choice go to ``OUT/lr-search.json``, and the chosen run's files are linked (or copied) into
``OUT``, which is then an ordinary run folder for ``clipguard evaluate``.

With canaries (:mod:`clipguard.training.canary`), two backdoors are poisoned into a copy of the
clean pairs and implanted into a copy of the model (``OUT/lr-search/implant``); every candidate
cleans that copy too (``OUT/lr-search/canary-lr-<lr>``) and its canaries' mean ASR@1 on
``--eval-data`` is recorded. The budget is measured on the real model's runs, and the run kept is
the real one: the canaries never reach it. On validation data the canaries ordered each defence's
recipes as the real attacks did, where drift ordered PAR's variants wrongly.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipguard.errors import ConfigError
from clipguard.io import read_json_object, read_jsonl, write_json

SEARCH_FILE = "lr-search.json"
SEARCH_DIR = "lr-search"
SELECT = ("drift", "canary")
RULES = {"drift": "farthest drift within the budget, else the most accurate",
         "canary": "least of the canaries left within the budget, else the most accurate"}
RUN_FILES = ("checkpoints", "params.json", "results.jsonl", "out.log")


@dataclass
class Candidate:
    lr: float
    folder: str
    zeroshot: float     # top-1 in %, on the clean validation data, after the last epoch
    drift: float        # embedding_drift of the validation images, start -> end
    canaries: list[float] | None = None  # ASR@1 (%) of each canary after cleaning the implanted copy

    @property
    def canary(self) -> float | None:
        """What is left of the canaries: their mean ASR@1 in %."""
        return None if self.canaries is None else sum(self.canaries) / len(self.canaries)

    def to_dict(self) -> dict[str, Any]:
        d = {"lr": self.lr, "folder": self.folder, "zeroshot": self.zeroshot, "drift": self.drift}
        if self.canaries is not None:
            d.update(canaries=self.canaries, canary=round(self.canary or 0.0, 2))
        return d


def within_budget(c: Candidate, start_zeroshot: float, budget: float) -> bool:
    """Whether a candidate's zero-shot stayed within ``budget`` points of the start's."""
    return c.zeroshot >= start_zeroshot - budget


def choose(candidates: list[Candidate], start_zeroshot: float, budget: float,
           select: str = "drift") -> tuple[Candidate, str]:
    """The rule: within ``budget`` points of the start, the farthest-moving candidate
    (``select="drift"``) or the one that leaves least of the canaries (``"canary"``); if none is
    within the budget, the most accurate."""
    if not candidates:
        raise ConfigError("--lr-search needs at least one learning rate")
    if select not in SELECT:
        raise ConfigError(f"--select must be one of {', '.join(SELECT)}, got {select!r}")
    within = [c for c in candidates if within_budget(c, start_zeroshot, budget)]
    if within and select == "canary":
        if any(c.canary is None for c in within):
            raise ConfigError("--select canary: a candidate has no canary measurement")
        return min(within, key=lambda c: (c.canary, -c.drift, c.lr)), "least of the canaries left within the budget"
    if within:
        return max(within, key=lambda c: (c.drift, -c.lr)), "farthest within the budget"
    return max(candidates, key=lambda c: (c.zeroshot, -c.lr)), "none within the budget: the most accurate"


def parse_lrs(text: str | Sequence[float]) -> list[float]:
    """``"3e-4,1e-3,3e-3"`` (or a list) -> sorted distinct positive floats (a clear error otherwise)."""
    items = str(text).split(",") if isinstance(text, str) else list(text)
    try:
        lrs = sorted({float(x) for x in items if str(x).strip()})
    except ValueError:
        raise ConfigError(f"--lr-search {text!r}: give learning rates separated by commas, e.g. 3e-4,1e-3,3e-3") from None
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ConfigError(f"--lr-search {text!r}: learning rates must be positive")
    return lrs


def _finished(folder: Path, epochs: int) -> bool:
    """Whether ``folder`` holds a run that trained all its ``epochs``."""
    results = folder / "results.jsonl"
    records = [r for r in read_jsonl(results) if "epoch" in r] if results.is_file() else []
    return bool(records) and records[-1]["epoch"] >= epochs


def _link_run(src: Path, out: Path) -> None:
    """Make ``out`` hold the chosen run: hard links where the file system allows, else copies."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    for name in RUN_FILES:
        s, d = src / name, out / name
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d)
        elif d.exists():
            d.unlink()
        if s.is_dir():
            shutil.copytree(s, d, copy_function=link, symlinks=True)
        elif s.is_file():
            link(str(s), str(d))


def _train(spec, data: str | Path, folder: Path, epochs: int, what: str, **kwargs: Any) -> bool:
    """Train ``folder`` unless it is finished (resuming what is there); whether it is finished now."""
    from clipguard.training import run_dir
    from clipguard.training.run import train_run

    if not _finished(folder, epochs):
        print(f"lr-search: {what} -> {folder}")
        train_run(spec, data, folder, resume="latest" if run_dir.has_run(folder) else None, **kwargs)
    return _finished(folder, epochs)  # not yet after --stop-after: come back with --resume latest


def lr_search(spec, lrs: list[float], budget: float, data: str | Path, out: str | Path, *,
              eval_data: str | Path | None, classes: str | Path | None = None, resume: str | None = None,
              overwrite: bool = False, select: str = "canary", canary=None, **train_kwargs: Any) -> dict[str, Any]:
    """Run every candidate learning rate, choose one by the rule, and make ``out`` that run.

    ``select``: ``"drift"`` or ``"canary"`` (see the module); ``canary``: its
    :class:`~clipguard.training.canary.CanaryOptions` (the defaults when None)."""
    from clipguard.api import load_model
    from clipguard.data.classes import ClassInfo
    from clipguard.data.csv_dataset import load_csv, require_labels
    from clipguard.evaluation.drift import embedding_drift
    from clipguard.evaluation.features import encode_images
    from clipguard.models.factory import model_image_size
    from clipguard.training import run_dir
    from clipguard.training.run import epoch_zeroshot, eval_classes

    out = Path(out)
    if eval_data is None:
        raise ConfigError("--lr-search measures clean accuracy: pass --eval-data (clean labelled validation "
                          "rows, not your test set) and its classes.json")
    if budget < 0:
        raise ConfigError(f"--budget must be >= 0 zero-shot points, got {budget}")
    if select not in SELECT:
        raise ConfigError(f"--select must be one of {', '.join(SELECT)}, got {select!r}")
    run_dir.check_out_path(out)
    done_file = out / SEARCH_FILE
    if done_file.is_file() and not overwrite:
        if resume is None:
            raise ConfigError(f"--out {out}: already holds a finished learning-rate search ({done_file}); "
                              "pass --overwrite to run it again, or choose another --out")
        return read_json_object(done_file, SEARCH_FILE)
    if overwrite and (out / SEARCH_DIR).is_dir():
        shutil.rmtree(out / SEARCH_DIR)
    run_dir.prepare(out, resume=resume, overwrite=overwrite)  # a run already in OUT: refused or removed

    size = model_image_size(spec.train.model)
    test = load_csv(eval_data, train_kwargs.get("data_spec"), image_size=size)
    require_labels(test, "--lr-search (--eval-data)")
    zeroshot = epoch_zeroshot(spec.train.model, test, ClassInfo.load(eval_classes(eval_data, classes)))
    start_model, _ = load_model(spec.train.checkpoint, model=spec.train.model)
    start_zs = 100 * zeroshot(start_model, 0)["zeroshot_top1"]  # start and end: one measurement
    start_features = encode_images(start_model, test.images, "cpu")

    implant = None
    if select == "canary":
        implant = _implant(spec, data, out, eval_data, eval_classes(eval_data, classes), canary, train_kwargs)
        if not implant.get("finished"):
            return {"finished": False}

    candidates = []
    for lr in lrs:
        folder = out / SEARCH_DIR / f"lr-{lr:g}"
        c_spec = replace(spec, train=spec.train.replace(lr=lr))
        if not _train(c_spec, data, folder, c_spec.train.epochs, f"lr {lr:g}", eval_data=eval_data, classes=classes,
                      **train_kwargs):
            return {"finished": False}
        end_model, _ = load_model(folder, model=spec.train.model)
        cand = Candidate(lr=lr, folder=str(folder.relative_to(out)),
                         zeroshot=round(100 * zeroshot(end_model, 0)["zeroshot_top1"], 2),
                         drift=round(embedding_drift(start_features, end_model, test.images), 4))
        if implant is not None:
            cand.canaries = _clean_canaries(c_spec, data, out, lr, implant, eval_data, classes, train_kwargs)
            if cand.canaries is None:
                return {"finished": False}
        candidates.append(cand)
    chosen, why = choose(candidates, start_zs, budget, select)
    _link_run(out / chosen.folder, out)
    result = {"finished": True, "select": select, "rule": RULES[select],
              "budget": budget, "start_zeroshot": round(start_zs, 2), "eval_data": str(eval_data),
              "candidates": [c.to_dict() for c in candidates], "chosen": chosen.to_dict(), "why": why,
              "within_budget": within_budget(chosen, start_zs, budget)}
    if implant is not None:
        result["canary"] = {k: v for k, v in implant.items() if k not in ("finished", "folders")}
    write_json(done_file, result)
    return result


def _implant(spec, data, out: Path, eval_data, classes, canary, train_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Plant the canaries into a copy of the clean pairs and implant them into a copy of the model
    by plain fine-tuning; a canary that does not take is an error (it would measure nothing)."""
    from clipguard import defenses
    from clipguard.api import load_model
    from clipguard.data.csv_dataset import CsvSpec
    from clipguard.training.canary import CanaryOptions, canary_asr, implant_recipe, plant

    opts = canary or CanaryOptions()
    if opts.seed is None:
        opts = replace(opts, seed=spec.train.seed)
    data_spec = train_kwargs.get("data_spec") or CsvSpec()
    folders = plant(data, eval_data, classes, out / SEARCH_DIR / "canary", data_spec, opts,
                    limit=train_kwargs.get("limit"))
    recipe = implant_recipe(spec.train.model)
    lr = opts.implant_lr if opts.implant_lr is not None else recipe["lr"]
    i_spec = replace(spec, defense="ft", options=defenses.resolve_options("ft", {}), preset=None,
                     train=spec.train.replace(lr=lr, epochs=opts.implant_epochs, warmup=recipe["warmup"]))
    folder = out / SEARCH_DIR / "implant"
    kwargs = {**train_kwargs, "data_spec": replace(data_spec, allow_outside_root=True), "attack_manifest": None,
              "limit": None}  # the canary copy holds the limited clean rows already
    if not _train(i_spec, folders[-1] / "train.csv", folder, opts.implant_epochs,
                  f"implanting the canaries at lr {lr:g}", **kwargs):
        return {"finished": False}
    model, _ = load_model(folder, model=spec.train.model)
    asr = canary_asr(model, spec.train.model, folders)
    names = [a for a, _ in opts.attacks]
    if min(asr) < opts.min_asr:
        raise ConfigError(f"the canaries did not implant ({', '.join(f'{n} {a:.0f}%' for n, a in zip(names, asr))} "
                          f"ASR@1 after {opts.implant_epochs} epochs at lr {lr:g}; each needs {opts.min_asr:g}%), so "
                          "they cannot measure a recipe: pass a larger --canary-lr, or use --select drift")
    manifests = [read_json_object(d / "manifest.json", "canary manifest") for d in folders]
    return {"finished": True, "folders": folders, "attacks": names, "targets": [m["target"]["name"] for m in manifests],
            "trigger_seeds": list(opts.trigger_seeds), "seed": opts.seed, "count": manifests[0]["count"],
            "implant": {"folder": str(folder.relative_to(out)), "lr": lr, "epochs": opts.implant_epochs,
                        "asr": asr}}


def _clean_canaries(c_spec, data, out: Path, lr: float, implant: dict[str, Any], eval_data, classes,
                    train_kwargs: dict[str, Any]) -> list[float] | None:
    """The candidate run again from the implanted copy; the canaries' ASR@1 after it (None: not finished)."""
    from clipguard.api import load_model
    from clipguard.training.canary import canary_asr
    from clipguard.training.run import finetune_start

    weights, _ = finetune_start(out / implant["implant"]["folder"], c_spec.train.model)
    k_spec = replace(c_spec, train=c_spec.train.replace(checkpoint=weights))
    folder = out / SEARCH_DIR / f"canary-lr-{lr:g}"
    if not _train(k_spec, data, folder, k_spec.train.epochs, f"lr {lr:g} on the implanted copy",
                  eval_data=eval_data, classes=classes, **train_kwargs):
        return None
    model, _ = load_model(folder, model=c_spec.train.model)
    return canary_asr(model, c_spec.train.model, implant["folders"])
