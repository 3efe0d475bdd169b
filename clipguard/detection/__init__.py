"""Finding poisoned pairs in an image-caption dataset from a CLIP model's embeddings.

Detectors are registered by name (``DETECTORS``; one module each under ``detectors/``) and score
``PairFeatures`` (normalised image and text embeddings of every pair): higher is more suspicious.
``scan`` is ``clipguard scan`` as a function; ``scan_features`` scores embeddings you already have.
Heavy parts (the model, scikit-learn, matplotlib) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from clipguard.detection.base import (
    DETECTORS,
    Detector,
    DetectorOptions,
    KeepDecision,
    PairFeatures,
    build,
    get,
    names,
)
from clipguard.detection.knn import knn

_LAZY = {"scan": "runner", "scan_features": "runner", "encode_pairs": "runner", "resolve_detectors": "runner",
         "parse_detector_options": "runner", "detection_metrics": "metrics", "grouped_metrics": "metrics"}

__all__ = ["DETECTORS", "Detector", "DetectorOptions", "KeepDecision", "PairFeatures", "build", "get", "knn",
           "names", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"clipguard.detection.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'clipguard.detection' has no attribute {name!r}")
