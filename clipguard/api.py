"""The Python API at the package root: poison, train with a defence, fine-tune, evaluate.

In the spirit of ``open_clip.create_model_and_transforms``, a short script needs one import::

    import clipguard

    clipguard.fashion_mnist("data/fm", train_size=10_000, test_size=2_000)
    clipguard.poison("data/fm/train.csv", "badnet", target="bag", rate=0.01,
                     out="data/badnet", eval_data="data/fm/test.csv")
    clipguard.train("data/badnet/train.csv", "runs/safeclip", defense="safeclip",
                    model="cg-tiny", epochs=20, eval_data="data/fm/test.csv")
    print(clipguard.evaluate("runs/safeclip", "data/fm/test.csv",
                             attack_manifest="data/badnet/manifest.json")["metrics"])

Every function takes the same settings as its CLI command and goes through the same code
(one run spec, one builder), so a run started from Python and one started from the shell with
the same settings write the same files and the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from clipguard.data.csv_dataset import CsvSpec, ImageCaptionData


def fashion_mnist(out: str | Path, *, train_size: int | None = None, test_size: int | None = None,
                  seed: int = 0, overwrite: bool = False) -> Path:
    """Debian's Fashion-MNIST as open_clip-style CSVs, PNGs and classes.json in ``out``."""
    from clipguard.data.fashion_mnist import materialise

    return materialise(out, train_size=train_size, test_size=test_size, seed=seed, overwrite=overwrite)


def load_data(path: str | Path, *, model: str = "cg-tiny", spec: CsvSpec | None = None,
              skip_bad_rows: bool = False, limit: int | None = None, lazy: bool = False) -> ImageCaptionData:
    """A CSV or webdataset dataset, decoded at ``model``'s image size."""
    from clipguard.data.registry import load_dataset
    from clipguard.models.factory import model_image_size

    return load_dataset(str(path), "auto", spec=spec, image_size=model_image_size(model), skip_bad_rows=skip_bad_rows,
                        limit=limit, lazy=lazy)


def poison(data: str | Path, attack: str, *, target: str | int, out: str | Path, rate: float | None = None,
           count: int | None = None, seed: int = 0, eval_data: str | Path | None = None,
           options: dict[str, Any] | None = None, overwrite: bool = False, **kwargs: Any) -> dict[str, Any]:
    """A poisoned copy of the dataset at ``data`` in ``out`` with its manifest (returned)."""
    from clipguard.attacks import poison_csv

    return poison_csv(data, attack, target=target, rate=rate, count=count, seed=seed, out=out,
                      eval_csv=eval_data, options=options, overwrite=overwrite, **kwargs)


def run_spec(*, defense: str | None = None, preset: str | Path | None = None,
             options: dict[str, Any] | None = None, stage: str = "pretrain", **train: Any):
    """The validated RunSpec for these settings (what ``train`` and ``finetune`` run)."""
    from clipguard.training.spec import resolve_spec

    return resolve_spec(stage=stage, defense=defense, preset=preset, options=options, train=[train])


def train(data: str | Path, out: str | Path, *, defense: str | None = None, preset: str | Path | None = None,
          options: dict[str, Any] | None = None, eval_data: str | Path | None = None,
          classes: str | Path | None = None, attack_manifest: str | Path | None = None,
          resume: str | None = None, overwrite: bool = False, spec: CsvSpec | None = None,
          lazy_images: bool = False, limit: int | None = None, skip_bad_rows: bool = False,
          retrain_keep: float | None = None, retrain_detector: str | None = None,
          retrain_veto: Sequence[str] | None = None,
          **settings: Any) -> dict[str, Any]:
    """Pre-train CLIP on ``data`` into the run folder ``out``, optionally with a defence.

    ``settings`` are TrainConfig fields (model, epochs, batch_size, lr, seed, device, ...);
    returns the last epoch's record (as in results.jsonl). ``retrain_keep``: screen, then retrain
    (as ``clipguard train --retrain-keep``): the defended run goes to ``out/screen`` and plain CLIP
    retrains on the pairs its final model keeps (``retrain_veto``: detectors whose own rule drops
    pairs too); the record then has the screen under ``"screen"``.
    """
    from clipguard.training.run import train_run
    from clipguard.training.screen import ScreenOptions

    run = run_spec(defense=defense, preset=preset, options=options, **settings)
    retrain = ScreenOptions.from_flags(retrain_keep, retrain_detector, retrain_veto)
    return train_run(run, data, out, data_spec=spec, lazy_images=lazy_images, limit=limit,
                     skip_bad_rows=skip_bad_rows, eval_data=eval_data, classes=classes,
                     attack_manifest=attack_manifest, resume=resume, overwrite=overwrite, retrain=retrain)


def finetune(checkpoint: str | Path, data: str | Path, out: str | Path, *, defense: str | None = None,
             preset: str | Path | None = None, options: dict[str, Any] | None = None,
             eval_data: str | Path | None = None, resume: str | None = None, overwrite: bool = False,
             spec: CsvSpec | None = None, lr_search: list[float] | None = None, budget: float = 3.0,
             select: str = "canary", canary_lr: float | None = None, **settings: Any) -> dict[str, Any]:
    """Clean a (possibly poisoned) model on clean ``data``: ft, cleanclip, cleanerclip or par.

    ``defense``: None takes the preset's, or ``ft`` without a preset (as ``clipguard finetune``).

    ``lr_search``: learning rates to choose from by the defender's rule on ``eval_data`` (as
    ``clipguard finetune --lr-search``); returns the search's record instead of the last epoch's.
    ``select``: how the search ranks them, ``"drift"`` or ``"canary"`` (``canary_lr``: the lr that
    implants the canaries)."""
    from clipguard.training.run import finetune_start, train_run

    weights, name = finetune_start(checkpoint, settings.pop("model", None))
    run = run_spec(defense=defense, preset=preset, options=options, stage="finetune", model=name,
                   checkpoint=weights, **settings)
    if lr_search is not None:
        from clipguard.training.canary import CanaryOptions
        from clipguard.training.lr_search import lr_search as search
        from clipguard.training.lr_search import parse_lrs

        return search(run, parse_lrs(lr_search), budget, data, out, eval_data=eval_data, resume=resume, overwrite=overwrite,
                      select=select, canary=CanaryOptions(implant_lr=canary_lr), data_spec=spec)
    return train_run(run, data, out, data_spec=spec, eval_data=eval_data, resume=resume, overwrite=overwrite)


def evaluate(checkpoint: str | Path, data: str | Path, *, classes: str | Path | None = None,
             attack_manifest: str | Path | None = None, probe_data: str | Path | None = None,
             device: str = "cpu", seed: int = 0, spec: CsvSpec | None = None, model: str | None = None,
             skip_bad_rows: bool = False) -> dict[str, Any]:
    """Zero-shot (and linear probe, retrieval, attack success) of a checkpoint, as ``clipguard evaluate``.

    ``classes``: the classes.json; when it is not given, the one beside ``data`` is used if the
    data has a label column to score against (otherwise only retrieval is measured)."""
    from clipguard.errors import DataError
    from clipguard.evaluation.runner import run_evaluation

    spec = spec or CsvSpec()
    if classes is not None:  # asked for: it must be there (no silent run without zero-shot)
        if not Path(classes).is_file():
            raise DataError("classes file not found (--classes)", file=str(classes))
    else:
        beside = Path(data).parent / "classes.json"
        classes = beside if beside.is_file() and spec.label_key else None
    result = run_evaluation(checkpoint, data, classes_json=classes, spec=spec, model_name=model,
                            probe_csv=probe_data, device=device, skip_bad_rows=skip_bad_rows, seed=seed)
    if attack_manifest is not None:
        from clipguard.evaluation.asr import attack_metrics

        result["metrics"]["attack"] = attack_metrics(checkpoint, attack_manifest, model_name=model,
                                                     device=device, probe_csv=probe_data, seed=seed)
    return result


def scan(data: str | Path, checkpoint: str | Path | Sequence[str | Path], out: str | Path, *,
         detectors: str | Sequence[str] | None = None, options: dict[str, dict[str, Any]] | None = None,
         attack_manifest: str | Path | None = None, keep_detector: str | None = None,
         keep_fraction: float | None = None, veto_detectors: Sequence[str] = (), model: str | None = None,
         device: str = "auto", spec: CsvSpec | None = None, overwrite: bool = False, progress: bool = False,
         reference: str | Path | None = None, **settings: Any) -> dict[str, Any]:
    """Score every pair of ``data`` with ``checkpoint``'s embeddings (a list: several models, their
    rank shares averaged, or with ``combine="max"`` the largest taken), as ``clipguard scan``: writes
    ``out/scores.csv``, ``out/kept.csv``, ``out/suspicious.csv`` and ``out/scan.json`` and returns
    scan.json's record. ``reference``: a model trained without ``data``, which ``shift`` compares
    with. ``settings``: the command's other options (``top``, ``batch_size``, ``chunk``, ``limit``,
    ``lazy_images``, ``skip_bad_rows``, ``dataset_type``, ``combine``, and ``search``: how neighbours
    are found, e.g. ``{"method": "ivf", "nprobe": 32}`` for faiss's approximate search)."""
    from clipguard.detection.runner import scan as _scan

    return _scan(data, checkpoint, out, model=model, detectors=detectors, options=options,
                 attack_manifest=attack_manifest, keep_fraction=keep_fraction, keep_detector=keep_detector,
                 veto_detectors=veto_detectors, overwrite=overwrite, device=device, spec=spec,
                 progress=progress, reference=reference, **settings)


def load_model(checkpoint: str | Path, *, model: str | None = None, device: str = "cpu"):
    """(model, tokenizer) from a run folder, a checkpoint folder or a .safetensors file."""
    from clipguard.evaluation.runner import load_model as _load
    from clipguard.models.factory import get_tokenizer

    net, name = _load(checkpoint, model, device)
    return net, get_tokenizer(name)
