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
    n_rows = obj.get("n_rows")
    if isinstance(n_rows, int) and rows and max(rows) >= n_rows:
        raise DataError(f"row {max(rows)} is beyond the {n_rows} rows the manifest describes",
                        file=str(path), field="poisoned_rows")
    obj["_dir"] = str(path.parent)
    return obj


def poison_mask(manifest: dict[str, Any] | str | Path, data: ImageCaptionData) -> torch.Tensor:
    """Bool (len(data),): True where the pair is poisoned.

    ``poisoned_rows`` are 0-based data rows of DIR/train.csv (CSV line - 2); ``data.rows`` holds
    the CSV line of each loaded pair, so skipped or limited rows map correctly.
    """
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest)
    check_matches(manifest, data)
    poisoned = set(int(r) for r in manifest["poisoned_rows"])
    lines = data.rows if data.rows else [i + 2 for i in range(len(data))]
    return torch.tensor([(line - 2) in poisoned for line in lines], dtype=torch.bool)


def check_matches(manifest: dict[str, Any], data: ImageCaptionData) -> None:
    """Refuse a manifest written for other data: its rows would mark the wrong pairs, or none,
    and every poison statistic would quietly read 0. Checks what the manifest records (older or
    hand-written manifests without a key skip that check)."""
    where = str(Path(manifest.get("_dir", ".")) / MANIFEST_FILE)
    hint = "; is this the manifest of that data (DIR/train.csv of the poisoned folder)?"
    if _is_shards(data):
        raise DataError("attack manifests index CSV rows; pass the poisoned CSV (DIR/train.csv), not "
                        "webdataset shards", file=data.source)
    src = manifest.get("source_csv")
    if src and data.source and Path(data.source).resolve() == Path(src):
        raise DataError(f"{data.source} is the clean source the manifest's poisoned copy was made from; "
                        "pass the poisoned DIR/train.csv", file=where, field="source_csv")
    rows = [int(r) for r in manifest["poisoned_rows"]]
    n_rows, n_data = manifest.get("n_rows"), data.n_source_rows
    if isinstance(n_rows, int) and n_data and n_rows != n_data:
        raise DataError(f"the manifest describes {n_rows} rows but {data.source} has {n_data}{hint}",
                        file=where, field="n_rows")
    if n_data and rows and max(rows) >= n_data:
        raise DataError(f"poisoned row {max(rows)} is beyond the {n_data} rows of {data.source}{hint}",
                        file=where, field="poisoned_rows")
    _check_captions(manifest, data, set(rows), where, hint)


def _check_captions(manifest: dict[str, Any], data: ImageCaptionData, poisoned: set[int], where: str,
                    hint: str) -> None:
    """Every poisoned pair carries one of the manifest's target captions."""
    captions = manifest.get("target_captions")
    if not captions:
        return
    allowed = {str(c).strip() for c in captions}
    lines = data.rows if data.rows else [i + 2 for i in range(len(data))]
    for i, line in enumerate(lines):
        if line - 2 in poisoned and data.captions[i] not in allowed:
            raise DataError(f"poisoned row {line - 2} of {data.source} has caption {data.captions[i]!r}, "
                            f"not one of the manifest's target captions{hint}", file=where,
                            field="target_captions")


def _is_shards(data: ImageCaptionData) -> bool:
    from clipguard.data.webdataset import TarImages

    return isinstance(data.images, TarImages)
