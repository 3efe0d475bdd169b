"""Screen, then retrain: a defended run's final model picks the pairs plain CLIP trains on again.

``clipguard train --defense safeclip --retrain-keep 0.7`` trains SafeCLIP on the data (the
*screening run*), lets its final model score every pair with a detector (caption-agreement by
default), drops the most suspicious ``1 - keep`` share and trains plain CLIP from scratch on the
rest. It is detect-then-train without trusted data: by the end of its run SafeCLIP's model ranks
the poisons about as well as a model trained on trusted pairs, but the few poisons that slipped
into its safe set early were learned through the CLIP loss and stay learned; a fresh model trained
on what the screen keeps never meets them early (docs/defenses.md#screen-then-retrain).

Layout of ``OUT``: ``OUT/screen/`` is the screening run (a run folder like any other),
``OUT/scan/`` the scan of the training data by its final model (``scores.csv``, ``kept.csv``,
``scan.json``, as ``clipguard scan`` writes them, plus ``screen.json`` with the dropped rows) and
``OUT`` itself the retrained run, the one ``clipguard evaluate OUT`` reads. ``resume`` continues
whichever step was interrupted with the very same kept pairs; ``overwrite`` redoes all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipguard.errors import ConfigError, DataError
from clipguard.io import read_json_object, write_json
from clipguard.training import run_dir
from clipguard.training.spec import RunSpec

SCREEN_DIR = "screen"
SCAN_DIR = "scan"
SCREEN_FILE = "screen.json"
SCREEN_FORMAT = 1


@dataclass(frozen=True)
class ScreenOptions:
    """What the screen keeps: the ``keep`` share of pairs the ``detector`` (with ``options``) finds
    least suspicious. Keep 0.7 and caption-agreement (k = 64) were chosen on validation data
    (configs/safeclip-detect-select.yaml)."""

    keep: float = 0.7
    detector: str = "caption-agreement"
    options: dict[str, Any] = field(default_factory=dict)
    veto: tuple[str, ...] = ()  # detectors whose own rule drops pairs too (``repeat``: targeted copies)

    def validate(self) -> None:
        from clipguard.detection.base import names

        if not (isinstance(self.keep, (int, float)) and math.isfinite(self.keep) and 0.0 < self.keep < 1.0):
            raise ConfigError(f"--retrain-keep must be in (0, 1): the share of pairs to retrain on, got {self.keep}")
        if self.detector not in names():
            raise ConfigError(f"--retrain-detector '{self.detector}' is not a detector "
                              f"(choose from: {', '.join(names())})")
        for v in self.veto:
            if v not in names():
                raise ConfigError(f"--retrain-veto '{v}' is not a detector (choose from: {', '.join(names())})")
            if v == self.detector:
                raise ConfigError(f"--retrain-veto '{v}' is the screen's detector; a veto must be another")

    @classmethod
    def from_flags(cls, keep: float | None, detector: str | None,
                   veto: str | Sequence[str] | None = None) -> ScreenOptions | None:
        """``--retrain-keep`` / ``--retrain-detector`` / ``--retrain-veto`` (or the API's
        arguments); None: train once."""
        from clipguard.detection.runner import detector_names

        if keep is None and detector is None and not veto:
            return None
        if keep is None:
            flag = "--retrain-detector" if detector is not None else "--retrain-veto"
            raise ConfigError(f"{flag} needs --retrain-keep (the share of pairs to retrain on)")
        return cls(keep=keep, **({"detector": detector} if detector else {}), veto=tuple(detector_names(veto)))

    def identity(self) -> dict[str, Any]:
        out = {"keep": float(self.keep), "detector": self.detector, "options": dict(sorted(self.options.items()))}
        if self.veto:  # only when given: a screen made before vetoes existed stays valid
            out["veto"] = list(self.veto)
        return out


def retrain_spec(spec: RunSpec) -> RunSpec:
    """The retrained run: plain CLIP with the screening run's trainer settings (same seed, budget)."""
    from clipguard.training.spec import resolve_spec

    plain = resolve_spec(stage=spec.stage, defense="none")
    return replace(spec, defense=plain.defense, options=plain.options, preset=None)


def _screen_weights(screen_dir: Path) -> str:
    """sha256 of the screening run's final weights: a scan is reused only for the model that made it."""
    from clipguard.io import sha256_file
    from clipguard.models.checkpoint import resolve_latest

    folder = resolve_latest(screen_dir / "checkpoints")
    return sha256_file(folder / "model.safetensors") if folder is not None else ""


def _read_screen(path: Path, screen: ScreenOptions, n: int, weights: str) -> dict[str, Any] | None:
    """A previous screen of the same data, settings and screening model, else None."""
    if not path.is_file():
        return None
    try:
        rec = read_json_object(path, "screen record")
    except DataError:  # written atomically, so only a hand edit breaks it: scan again
        return None
    if (rec.get("format") != SCREEN_FORMAT or rec.get("settings") != screen.identity() or rec.get("n_pairs") != n
            or rec.get("screen_weights_sha256") != weights):
        return None
    return rec


def _finished(folder: Path, epochs: int) -> bool:
    from clipguard.io import read_jsonl

    path = folder / "results.jsonl"
    return path.is_file() and any(r.get("epoch") == epochs for r in read_jsonl(path))


def screen_and_retrain(spec: RunSpec, train_data, out: str | Path, *, screen: ScreenOptions,
                       make_trainer, data_label: str, kind: str, data_spec, attack_manifest: str | Path | None = None,
                       resume: str | None = None, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run the three steps into ``out``; returns the retrained run's last epoch record with the
    screen's summary under ``"screen"``.

    ``make_trainer(spec, data, folder, diagnostics)`` builds a trainer (the caller's evaluation
    hook and settings); ``train_data`` is the loaded training set, scanned and subset in memory.
    The caller (``run.train_run``) has validated ``screen`` and refused folders holding a run
    before the data was loaded."""
    from clipguard.detection.base import build
    from clipguard.detection.runner import scan_pairs
    from clipguard.evaluation.runner import load_model
    from clipguard.models.device import resolve_device
    from clipguard.training.distributed import rank_zero_first

    out = Path(out)
    screen_dir, scan_dir = out / SCREEN_DIR, out / SCAN_DIR
    final = retrain_spec(spec)
    n = len(train_data)

    # 1. the screening run (skipped when it already finished: resume on a finished run trains nothing)
    screen_trainer = make_trainer(spec, train_data, screen_dir, True)
    last = screen_trainer.fit(resume="latest" if resume is not None and run_dir.has_run(screen_dir) else None,
                              overwrite=overwrite)
    if not _finished(screen_dir, spec.train.epochs):  # --stop-after: the screen needs the final model
        return {**last, "screen": {"stopped": True, "screen_run": SCREEN_DIR}}

    # 2. the scan by its final model: made once (rank 0 under torchrun) and kept on disk, so a resumed
    #    retraining uses exactly the pairs it started with
    path = scan_dir / SCREEN_FILE
    weights = _screen_weights(screen_dir)

    def make() -> dict[str, Any]:
        if not overwrite:
            rec = _read_screen(path, screen, n, weights)
            if rec is not None:
                return rec
        dev = resolve_device(spec.train.device)
        net, model_name = load_model(str(screen_dir), spec.train.model, str(dev))
        dets = [build(screen.detector, screen.options), *(build(v) for v in screen.veto)]
        scan_dir.mkdir(parents=True, exist_ok=True)
        summary, result = scan_pairs(train_data, net, model_name, scan_dir, dets, keep_detector=screen.detector,
                                     keep_fraction=screen.keep, veto_detectors=screen.veto, attack_manifest=attack_manifest, kind=kind,
                                     spec=data_spec, top=100, device=dev, progress=not quiet,
                                     sources={"data": data_label, "checkpoint": str(screen_dir)})
        keep = result.keep.mask
        rec = {"format": SCREEN_FORMAT, "settings": screen.identity(), "n_pairs": n, "kept": int(keep.sum()),
               "dropped": int(n - keep.sum()), "screen_run": SCREEN_DIR, "screen_weights_sha256": weights,
               "poisons_kept": summary["keep"].get("poisons_kept"), "n_poisoned": summary.get("n_poisoned"),
               "dropped_rows": np.flatnonzero(~keep).tolist()}
        write_json(path, rec)
        return rec

    def read() -> dict[str, Any]:
        rec = _read_screen(path, screen, n, weights)
        if rec is None:
            raise RuntimeError(f"rank 0 wrote no {path}")
        return rec

    rec = rank_zero_first(make, read)
    keep = np.ones(n, dtype=bool)
    keep[np.asarray(rec["dropped_rows"], dtype=np.int64)] = False
    kept_data = train_data.subset(np.flatnonzero(keep).tolist())

    # 3. plain CLIP from scratch on the kept pairs, into OUT
    trainer = make_trainer(final, kept_data, out, attack_manifest is not None)
    last = trainer.fit(resume="latest" if resume is not None and run_dir.has_run(out) else None, overwrite=overwrite)
    summary = {k: v for k, v in rec.items() if k not in ("dropped_rows", "screen_weights_sha256")}
    return {**last, "screen": summary}
