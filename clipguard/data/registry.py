"""Dataset loaders by type, as open_clip's ``--dataset-type csv|webdataset``."""

from __future__ import annotations

from typing import Callable

from clipguard.data.csv_dataset import CsvSpec, ImageCaptionData, load_csv
from clipguard.data.webdataset import load_webdataset
from clipguard.registry import Registry

Loader = Callable[..., ImageCaptionData]
DATASETS: Registry[Loader] = Registry("dataset type")


@DATASETS.register("csv")
def _csv(path: str, *, spec: CsvSpec | None, image_size: int | None, skip_bad_rows: bool = False,
         limit: int | None = None, lazy: bool = False) -> ImageCaptionData:
    return load_csv(path, spec, image_size=image_size, skip_bad_rows=skip_bad_rows, limit=limit, lazy=lazy)


@DATASETS.register("webdataset")
def _wds(path: str, *, spec: CsvSpec | None, image_size: int | None, skip_bad_rows: bool = False,
         limit: int | None = None, lazy: bool = True) -> ImageCaptionData:
    if image_size is None:
        raise ValueError("webdataset input needs the model's image size")
    return load_webdataset(path, image_size=image_size, skip_bad_rows=skip_bad_rows, limit=limit)


def infer_type(path: str) -> str:
    return "webdataset" if path.endswith(".tar") or "::" in path or ".tar" in path.split("/")[-1] else "csv"


def load_dataset(path: str, dataset_type: str = "auto", **kw) -> ImageCaptionData:
    kind = infer_type(path) if dataset_type == "auto" else dataset_type
    return DATASETS.get(kind)(path, **kw)
