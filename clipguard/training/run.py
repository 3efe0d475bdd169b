"""A training run from paths: load the data, check the folder, build the trainer, fit.

``clipguard train``/``finetune`` and ``clipguard.train``/``clipguard.finetune`` in Python both
end here, so a run started either way checks the same things in the same order: settings
first, then the output folder, then the data (which may take minutes to load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipguard.data.csv_dataset import CsvSpec
from clipguard.errors import ConfigError
from clipguard.training import run_dir
from clipguard.training.spec import RunSpec


def train_run(spec: RunSpec, data: str | Path, out: str | Path, *, data_spec: CsvSpec | None = None,
              dataset_type: str = "auto", lazy_images: bool = False, limit: int | None = None,
              skip_bad_rows: bool = False, eval_data: str | Path | None = None,
              classes: str | Path | None = None, attack_manifest: str | Path | None = None,
              resume: str | None = None, overwrite: bool = False, retrain=None) -> dict[str, Any]:
    """Train ``spec`` on the dataset at ``data`` into ``out``; returns the last epoch's record.

    ``retrain`` (a ``screen.ScreenOptions``): screen, then retrain. The run goes to ``out/screen``,
    its final model scores every pair, and plain CLIP trains from scratch on the pairs kept, into
    ``out`` (clipguard.training.screen)."""
    from clipguard.data.classes import ClassInfo
    from clipguard.data.csv_dataset import check_limit, load_csv, require_labels
    from clipguard.data.registry import load_dataset
    from clipguard.models.factory import model_image_size
    from clipguard.training.build import build_trainer

    out = Path(out)
    check_limit(limit)  # up front, before the output folder is checked
    if retrain is not None:
        retrain.validate()
        if spec.stage != "pretrain":
            raise ConfigError("--retrain-keep is a pre-training step (screen, then retrain from scratch)")
    run_dir.check_out_path(out)
    if resume is None and not overwrite:
        run_dir.prepare(out, resume=None, overwrite=False)  # refuses a finished run before data is loaded
        if retrain is not None:  # and a screening run left in out/screen
            from clipguard.training.screen import SCREEN_DIR

            run_dir.prepare(out / SCREEN_DIR, resume=None, overwrite=False)
    if classes is not None and eval_data is None:
        raise ConfigError("--classes is used with --eval-data (zero-shot after each epoch); pass --eval-data too")
    size = model_image_size(spec.train.model)
    train = load_dataset(str(data), dataset_type, spec=data_spec, image_size=size,
                         skip_bad_rows=skip_bad_rows, limit=limit, lazy=lazy_images)
    if train.skipped:
        print(f"skipped {train.skipped} bad rows of {data}")
    evaluate = None
    if eval_data is not None:
        classes_path = eval_classes(eval_data, classes)
        test = load_csv(eval_data, data_spec, image_size=size, skip_bad_rows=skip_bad_rows)
        require_labels(test, "zero-shot evaluation (--eval-data)")
        evaluate = epoch_zeroshot(spec.train.model, test, ClassInfo.load(classes_path))

    def make_trainer(run: RunSpec, pairs, folder: Path, diagnose: bool):
        diagnostics = None
        if diagnose and attack_manifest is not None:
            from clipguard.evaluation.detection import make_diagnostics

            diagnostics = make_diagnostics(attack_manifest, pairs)
        return build_trainer(run, pairs, folder, evaluate=evaluate, diagnostics=diagnostics)

    if retrain is not None:
        from clipguard.data.registry import infer_type
        from clipguard.training.screen import screen_and_retrain

        return screen_and_retrain(spec, train, out, screen=retrain, make_trainer=make_trainer, data_label=str(data),
                                  kind=infer_type(str(data)) if dataset_type == "auto" else dataset_type,
                                  data_spec=data_spec or CsvSpec(), attack_manifest=attack_manifest,
                                  resume=resume, overwrite=overwrite, quiet=spec.train.quiet)
    return make_trainer(spec, train, out, True).fit(resume=resume, overwrite=overwrite)


def eval_classes(eval_data: str | Path, classes: str | Path | None) -> Path:
    """The classes.json for ``--eval-data``: ``--classes``, else the one beside the CSV."""
    path = Path(classes) if classes else Path(eval_data).parent / "classes.json"
    if not path.is_file():
        raise ConfigError(f"--eval-data needs classes.json: {path} not found (pass --classes)")
    return path


def epoch_zeroshot(model_name: str, eval_data, classes):
    """The per-epoch hook that adds zero-shot top-1/top-5 to results.jsonl."""
    from clipguard.evaluation.runner import zeroshot_metrics
    from clipguard.models.factory import get_tokenizer

    tokenizer = get_tokenizer(model_name)

    def evaluate(model, epoch: int) -> dict[str, Any]:
        device = next(model.parameters()).device
        m = zeroshot_metrics(model, tokenizer, eval_data, classes, device)
        return {"zeroshot_top1": round(m["acc1"], 4), "zeroshot_top5": round(m.get("acc5", float("nan")), 4)}

    return evaluate


def finetune_start(checkpoint: str | Path, model: str | None = None) -> tuple[str, str]:
    """(weights file, model name) of the model to clean: a run folder, a checkpoint folder or a
    .safetensors file; the name comes from its state.json unless ``model`` is given."""
    from clipguard.evaluation.runner import resolve_model

    try:
        weights, name = resolve_model(checkpoint, model)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return str(weights), name
