"""manifest.json of a poisoned dataset: what was done, and which rows it touched.

Defences never read it; it is for diagnostics (detection AUROC) and the ASR evaluation only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.errors import DataError
from clipguard.io import read_json_object

MANIFEST_FILE = "manifest.json"
REQUIRED = ("attack", "params", "seed", "target", "target_captions", "poisoned_rows", "mode",
            "source_csv", "source_sha256", "clipguard_version")


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST_FILE if path.is_dir() else path


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a manifest; ``_dir`` is added so relative paths inside it resolve."""
    path = manifest_path(path)
    obj = read_json_object(path, "attack manifest")
    for key in REQUIRED:
        if key not in obj:
            raise DataError("missing key", file=str(path), field=key)
    rows = obj["poisoned_rows"]
    if not isinstance(rows, list) or not all(isinstance(r, int) and r >= 0 for r in rows):
        raise DataError("must be a list of non-negative row indices", file=str(path), field="poisoned_rows")
    obj["_dir"] = str(path.parent)
    return obj


def poison_mask(manifest: dict[str, Any] | str | Path, data: ImageCaptionData) -> torch.Tensor:
    """Bool (len(data),): True where the pair is poisoned.

    ``poisoned_rows`` are 0-based data rows of DIR/train.csv (CSV line - 2); ``data.rows`` holds
    the CSV line of each loaded pair, so skipped or limited rows map correctly.
    """
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest)
    poisoned = set(int(r) for r in manifest["poisoned_rows"])
    lines = data.rows if data.rows else [i + 2 for i in range(len(data))]
    return torch.tensor([(line - 2) in poisoned for line in lines], dtype=torch.bool)
