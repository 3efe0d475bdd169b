"""The one place a Trainer is made: the CLI, the bench and the Python API all come through here."""

from __future__ import annotations

from pathlib import Path

from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.training.spec import RunSpec
from clipguard.training.trainer import DiagnosticsCallback, EpochCallback, Trainer


def build_trainer(spec: RunSpec, data: ImageCaptionData, out_dir: str | Path, *,
                  evaluate: EpochCallback | None = None,
                  diagnostics: DiagnosticsCallback | None = None) -> Trainer:
    """A Trainer for ``spec`` on ``data`` writing to ``out_dir``; call ``.fit()`` to run it."""
    return Trainer(spec.train, data, out_dir, strategy=spec.build_strategy(), evaluate=evaluate,
                   diagnostics=diagnostics)
