"""``clipguard finetune --lr-search``: choose the fine-tuning learning rate by the defender's rule.

A fine-tuning defence removes a backdoor only if it moves the model far enough, and the learning
rate that does so depends on the model and on the clean set. The defender does not know the
trigger, so the choice cannot look at attack success; what they can measure is clean accuracy
and how far the model moved. The rule (the one that chose the small models' recipe,
docs/finetuning.md#settings):

    among the candidate learning rates whose zero-shot accuracy on the clean validation data
    (``--eval-data``) stays within ``budget`` points of the starting model's, take the one that
    moved the validation images farthest (:func:`clipguard.evaluation.drift.embedding_drift`);
    if none stays within the budget, the most accurate one.

Each candidate is a full run in ``OUT/lr-search/lr-<lr>/`` (resumable like any run); the table and
the choice go to ``OUT/lr-search.json``, and the chosen run's files are linked (or copied) into
``OUT``, which is then an ordinary run folder for ``clipguard evaluate``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipguard.errors import ConfigError
from clipguard.io import read_json_object, read_jsonl, write_json

SEARCH_FILE = "lr-search.json"
SEARCH_DIR = "lr-search"
RUN_FILES = ("checkpoints", "params.json", "results.jsonl", "out.log")


@dataclass
class Candidate:
    lr: float
    folder: str
    zeroshot: float     # top-1 in %, on the clean validation data, after the last epoch
    drift: float        # embedding_drift of the validation images, start -> end

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "folder": self.folder, "zeroshot": self.zeroshot, "drift": self.drift}


def choose(candidates: list[Candidate], start_zeroshot: float, budget: float) -> tuple[Candidate, str]:
    """The rule: the farthest-moving candidate within ``budget`` points, else the most accurate."""
    if not candidates:
        raise ConfigError("--lr-search needs at least one learning rate")
    within = [c for c in candidates if c.zeroshot >= start_zeroshot - budget]
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


def lr_search(spec, lrs: list[float], budget: float, data: str | Path, out: str | Path, *,
              eval_data: str | Path | None, classes: str | Path | None = None, resume: str | None = None,
              overwrite: bool = False, **train_kwargs: Any) -> dict[str, Any]:
    """Run every candidate learning rate, choose one by the rule, and make ``out`` that run."""
    from clipguard.api import load_model
    from clipguard.data.classes import ClassInfo
    from clipguard.data.csv_dataset import load_csv, require_labels
    from clipguard.evaluation.drift import embedding_drift
    from clipguard.evaluation.features import encode_images
    from clipguard.models.factory import model_image_size
    from clipguard.training import run_dir
    from clipguard.training.run import epoch_zeroshot, eval_classes, train_run

    out = Path(out)
    if eval_data is None:
        raise ConfigError("--lr-search measures clean accuracy: pass --eval-data (clean labelled validation "
                          "rows, not your test set) and its classes.json")
    if budget < 0:
        raise ConfigError(f"--budget must be >= 0 zero-shot points, got {budget}")
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

    candidates = []
    for lr in lrs:
        folder = out / SEARCH_DIR / f"lr-{lr:g}"
        c_spec = type(spec)(stage=spec.stage, defense=spec.defense, options=spec.options,
                            train=spec.train.replace(lr=lr), preset=spec.preset)
        if not _finished(folder, c_spec.train.epochs):
            print(f"lr-search: lr {lr:g} -> {folder}")
            train_run(c_spec, data, folder, eval_data=eval_data, classes=classes,
                      resume="latest" if run_dir.has_run(folder) else None, **train_kwargs)
            if not _finished(folder, c_spec.train.epochs):  # --stop-after: come back with --resume latest
                return {"finished": False}
        end_model, _ = load_model(folder, model=spec.train.model)
        candidates.append(Candidate(lr=lr, folder=str(folder.relative_to(out)),
                                    zeroshot=round(100 * zeroshot(end_model, 0)["zeroshot_top1"], 2),
                                    drift=round(embedding_drift(start_features, end_model, test.images), 4)))
    chosen, why = choose(candidates, start_zs, budget)
    _link_run(out / chosen.folder, out)
    result = {"finished": True, "rule": "farthest drift within the budget, else the most accurate",
              "budget": budget, "start_zeroshot": round(start_zs, 2), "eval_data": str(eval_data),
              "candidates": [c.to_dict() for c in candidates], "chosen": chosen.to_dict(), "why": why}
    write_json(done_file, result)
    return result
