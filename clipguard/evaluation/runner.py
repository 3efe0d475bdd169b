"""``clipguard evaluate``: one JSON per run, keys in CLIP_benchmark's style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import clipguard
from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import CsvSpec, ImageCaptionData, load_csv, read_rows
from clipguard.errors import ConfigError, DataError
from clipguard.evaluation.features import encode_images, encode_tokens
from clipguard.evaluation.linear_probe import LinearProbe, fit_probe
from clipguard.evaluation.retrieval import recall_at_k
from clipguard.evaluation.zeroshot import mean_per_class_recall, topk_accuracy, zeroshot_classifier
from clipguard.models import checkpoint as ckpt
from clipguard.models.device import resolve_device
from clipguard.models.factory import LOCAL_DIR, create_model, get_tokenizer, image_size


def resolve_checkpoint(path: str | Path) -> tuple[Path, str | None]:
    """Accept a run folder, a checkpoint folder or a .safetensors file; return weights + model name.

    The name comes from the checkpoint's state.json; a folder without one but with
    open_clip_config.json (an open_clip local-dir export) names itself ``local-dir:FOLDER``."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        latest = ckpt.resolve_latest(path / "checkpoints")
        if latest is None:
            raise ConfigError(f"{path}: no finished checkpoint in checkpoints/")
        path = latest
    weights = ckpt.resolve_weights(path)
    name = ckpt.read_state(weights.parent).get("model")
    if name is None and (weights.parent / ckpt.OPEN_CLIP_CONFIG).is_file():
        name = f"{LOCAL_DIR}{weights.parent}"
    return weights, name


def resolve_model(checkpoint: str | Path, model_name: str | None = None) -> tuple[Path, str]:
    """(weights file, model name): ``model_name`` wins over what the checkpoint says; one is needed."""
    weights, name = resolve_checkpoint(checkpoint)
    name = model_name or name
    if name is None:
        raise ConfigError(f"{checkpoint}: no state.json says which model this is; pass --model")
    return weights, name


def load_model(checkpoint: str | Path, model_name: str | None = None, device: str = "cpu"):
    weights, name = resolve_model(checkpoint, model_name)
    model = create_model(name, checkpoint=weights, device=resolve_device(device))
    model.eval()
    return model, name


def _require_labels(data: ImageCaptionData, spec: CsvSpec | None, what: str,
                    n_classes: int | None = None) -> None:
    """Zero-shot and the linear probe score against labels: data without any is an error."""
    key = (spec or CsvSpec()).label_key
    if not bool((data.labels >= 0).any()):
        if key is None:
            why = "labels are switched off (--csv-label-key '')"
        else:
            header = read_rows(data.source, spec or CsvSpec())[0] if data.source else []
            why = (f"the label column '{key}' is empty" if key in header
                   else f"it has no label column '{key}' (columns: {', '.join(header)})")
        raise DataError(f"{what} needs labelled data, but {why}; set --csv-label-key to the label "
                        f"column, or evaluate retrieval only (no --classes, --probe-data)",
                        file=data.source or None)
    if n_classes is not None:
        top = int(data.labels.max())
        if top >= n_classes:
            raise DataError(f"label {top} is out of range for the {n_classes} classes of the classes "
                            f"file (labels are 0..{n_classes - 1})", file=data.source or None)


def zeroshot_metrics(model, tokenizer, data: ImageCaptionData, classes: ClassInfo, device) -> dict[str, Any]:
    labelled = (data.labels >= 0).nonzero().squeeze(1)
    feats = encode_images(model, data.images, device, indices=labelled)
    clf = zeroshot_classifier(model, tokenizer, classes, device)
    labels = data.labels[labelled]
    acc = topk_accuracy(feats, labels, clf, (1, 5))
    return {**acc, "mean_per_class_recall": mean_per_class_recall(feats, labels, clf),
            "n_images": int(len(labelled))}


def evaluate_model(model, model_name: str, data: ImageCaptionData, classes: ClassInfo | None, *,
                   device: str = "cpu", probe_data: ImageCaptionData | None = None,
                   probe: LinearProbe | None = None, retrieval: bool = True, seed: int = 0) -> dict[str, Any]:
    """Zero-shot, linear probe (``probe``: already fitted on ``probe_data``'s features) and retrieval."""
    tokenizer = get_tokenizer(model_name)
    metrics: dict[str, Any] = {}
    if classes is not None:
        metrics["zeroshot"] = zeroshot_metrics(model, tokenizer, data, classes, device)
    if probe_data is not None:
        if probe is None:
            probe = fit_probe(model, probe_data, device, seed)
        feats = encode_images(model, data.images, device)
        metrics["linear_probe"] = {**probe.score(feats, data.labels), "n_train": len(probe_data),
                                   **probe.selection()}
    if retrieval:
        img = encode_images(model, data.images, device)
        txt = encode_tokens(model, tokenizer(data.captions), device)
        metrics["retrieval"] = recall_at_k(img, txt)
    return metrics


def run_evaluation(checkpoint: str | Path, data_csv: str | Path, *, classes_json: str | Path | None,
                   spec: CsvSpec | None = None, model_name: str | None = None,
                   probe_csv: str | Path | None = None, device: str = "cpu",
                   skip_bad_rows: bool = False, seed: int = 0) -> dict[str, Any]:
    resolve_device(device)
    torch.manual_seed(seed)
    model, name = load_model(checkpoint, model_name, device)
    size = image_size(model)
    data = load_csv(data_csv, spec, image_size=size, skip_bad_rows=skip_bad_rows)
    classes = ClassInfo.load(classes_json) if classes_json else None
    if classes is not None:
        _require_labels(data, spec, "zero-shot classification", len(classes.classes))
    probe = load_csv(probe_csv, spec, image_size=size, skip_bad_rows=skip_bad_rows) if probe_csv else None
    if probe is not None:
        _require_labels(probe, spec, "the linear probe")
        _require_labels(data, spec, "the linear probe")
    metrics = evaluate_model(model, name, data, classes, device=device, probe_data=probe, seed=seed)
    return {"model": name, "checkpoint": str(checkpoint), "dataset": str(data_csv),
            "task": "zeroshot_classification" if classes else "retrieval",
            "metrics": metrics, "n_samples": len(data), "skipped_rows": data.skipped,
            "clipguard_version": clipguard.__version__}
