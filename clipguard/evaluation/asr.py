"""Attack success rate: one protocol, stated with every number it produces.

Backdoor: the trigger is applied to held-out images whose true class is NOT the target (those
images were written by ``clipguard poison --eval-data``); ASR@k = fraction whose top-k zero-shot
predictions contain the target. Rows whose label equals their target are dropped again here, so a
hand-made evaluation CSV cannot smuggle target-class images in (a bug of the BadCLIP code).
TDPA: fraction of the target images whose top-1 prediction is the adversarial class.
Linear probe: the same with a logistic-regression probe fitted on clean training features (its
C chosen on a validation split of them). Each ASR@1 carries its number of images ``n`` and the
95% Wilson score interval of the rate, ``asr@1_ci95``. The same model on the untriggered images
gives ``clean_rate@k``, the base rate beside the ASR.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from clipguard.attacks.base import is_targeted
from clipguard.attacks.manifest import load_manifest
from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import CsvSpec, ImageCaptionData, load_csv
from clipguard.errors import DataError
from clipguard.evaluation.features import encode_images
from clipguard.evaluation.intervals import wilson_ci95
from clipguard.evaluation.linear_probe import LinearProbe, fit_probe
from clipguard.evaluation.zeroshot import zeroshot_classifier


def asr_ks(n_classes: int) -> list[int]:
    """k = 1 and every larger k in (3, 5, 10) that is still below the number of classes."""
    return [1] + [k for k in (3, 5, 10) if k < n_classes]


def hits_at_k(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (N,): the target is among the top-k classes of each row of ``scores``."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == targets.view(-1, 1)).any(1)


def _rates(scores: torch.Tensor, targets: torch.Tensor, ks: list[int], prefix: str) -> dict[str, float]:
    return {f"{prefix}@{k}": round(float(hits_at_k(scores, targets, k).float().mean()), 6) for k in ks}


def _asr1_interval(hits: torch.Tensor) -> dict[str, Any]:
    """Beside an ASR@1: its images ``n``, the successes and the 95% Wilson interval of the rate."""
    k, n = int(hits.sum()), len(hits)
    return {"asr@1_ci95": wilson_ci95(k, n), "n": n}


class AsrSet:
    """The ASR evaluation images of a manifest, triggered and clean, with their targets."""

    def __init__(self, manifest: dict[str, Any], image_size: int | None):
        ev = manifest.get("eval")
        if not ev:
            raise DataError("the manifest has no 'eval' section: re-run `clipguard poison` with --eval-data",
                            file=str(Path(manifest["_dir"]) / "manifest.json"), field="eval")
        self.spec = manifest_csv_spec(manifest)
        self.path = Path(manifest["_dir"]) / ev["csv"]
        self.kind = ev["kind"]
        self.triggered = load_csv(self.path, self.spec, image_size=image_size)
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=self.spec.separator))
        try:
            self.targets = torch.tensor([int(r["target"]) for r in rows], dtype=torch.long)
        except (KeyError, ValueError):
            raise DataError("needs an integer 'target' column", file=str(self.path), field="target") from None
        self.trigger_names = [r.get("trigger", "") for r in rows]
        self.eval_rows = [r.get("eval_row", "") for r in rows]
        clean_paths = [r.get("clean_filepath", "") for r in rows]
        self.clean: ImageCaptionData | None = None
        if all(clean_paths):
            self.clean = _load_paths(self.path, clean_paths, self.triggered, image_size)
        self.labels = self.triggered.labels
        if bool((self.labels < 0).any()):
            raise DataError("every ASR image needs its true label", file=str(self.path), field="label")


def _load_paths(csv_path: Path, paths: list[str], like: ImageCaptionData, image_size: int | None
                ) -> ImageCaptionData:
    """Load the clean counterparts by path, reusing the CSV loader's decoding and checks."""
    from clipguard.data.csv_dataset import _decode

    root = csv_path.parent
    imgs = []
    for i, p in enumerate(paths):
        if not (root / p).is_file():
            raise DataError(f"image not found: {root / p}", file=str(csv_path), row=i + 2, field="clean_filepath")
        imgs.append(torch.from_numpy(_decode(root / p, image_size)))
    return ImageCaptionData(images=torch.stack(imgs), captions=list(like.captions), labels=like.labels.clone(),
                            paths=list(paths), source=str(csv_path), rows=list(like.rows))


def _protocol(aset: AsrSet, classes: ClassInfo, n: int, ks: list[int], excluded: list[int],
              manifest: dict[str, Any], classifier: str) -> dict[str, Any]:
    names = classes.classes
    return {"kind": aset.kind, "ks": ks, "n_images": n, "n_classes": len(names),
            "excluded_class": [{"index": c, "name": names[c]} for c in excluded],
            "target": sorted({names[int(t)] for t in aset.targets.unique().tolist()}),
            "attack": manifest["attack"], "triggers": sorted(set(t for t in aset.trigger_names if t)),
            "classifier": classifier, "eval_csv": str(aset.path)}


def _score_block(scores_trig: torch.Tensor, scores_clean: torch.Tensor | None, aset: AsrSet,
                 keep: torch.Tensor, ks: list[int], classes: ClassInfo, manifest: dict[str, Any],
                 classifier: str) -> dict[str, Any]:
    tg, lab = aset.targets[keep], aset.labels[keep]
    st = scores_trig[keep]
    excluded = sorted(set(int(t) for t in tg.tolist()))
    if is_targeted(aset.kind):
        pred = st.argmax(1)
        out: dict[str, Any] = {"asr@1": round(float((pred == tg).float().mean()), 6),
                               "n_success": int((pred == tg).sum()), **_asr1_interval(pred == tg)}
        out["per_target"] = [{"eval_row": aset.eval_rows[i], "label": classes.classes[int(lab[j])],
                              "predicted": classes.classes[int(pred[j])]}
                             for j, i in enumerate(keep.nonzero().flatten().tolist())]
        out["protocol"] = _protocol(aset, classes, int(keep.sum()), [1], excluded, manifest, classifier)
        out["protocol"]["definition"] = "fraction of target images whose top-1 prediction is the adversarial class"
        return out
    out = _rates(st, tg, ks, "asr")
    hits1 = hits_at_k(st, tg, 1)
    out.update({"n_success@1": int(hits1.sum()), **_asr1_interval(hits1)})
    out["triggered_accuracy@1"] = round(float((st.argmax(1) == lab).float().mean()), 6)
    if scores_clean is not None:
        out.update(_rates(scores_clean[keep], tg, ks, "clean_rate"))
        out["clean_accuracy@1"] = round(float((scores_clean[keep].argmax(1) == lab).float().mean()), 6)
    trig = [aset.trigger_names[i] for i in keep.nonzero().flatten().tolist()]
    if len(set(trig)) > 1:
        out["per_trigger"] = {}
        for t in sorted(set(trig)):
            sel = torch.tensor([x == t for x in trig])
            out["per_trigger"][t] = {**_rates(st[sel], tg[sel], ks, "asr"), "n_images": int(sel.sum()),
                                     "asr@1_ci95": _asr1_interval(hits1[sel])["asr@1_ci95"]}
    out["protocol"] = _protocol(aset, classes, int(keep.sum()), ks, excluded, manifest, classifier)
    out["protocol"]["definition"] = ("fraction of triggered held-out images of non-target classes whose "
                                     "top-k predictions contain the target class")
    return out


def manifest_classes_path(manifest: dict[str, Any]) -> Path:
    """The classes.json a loaded manifest names (default: the one in its folder)."""
    return Path(manifest["_dir"]) / (manifest.get("classes") or "classes.json")


_ASR_SETS: dict[tuple[str, int | None], AsrSet] = {}


def load_asr_set(manifest: dict[str, Any], image_size: int | None, *, cache: bool = False) -> AsrSet:
    """The eval set of a manifest; ``cache``: keep it for the process (a grid measures every model
    of a cell group on the same, immutable, poisoned folder)."""
    if not cache:
        return AsrSet(manifest, image_size)
    key = (str(Path(manifest["_dir"]).resolve()), image_size)
    if key not in _ASR_SETS:
        if len(_ASR_SETS) >= 16:
            _ASR_SETS.clear()
        _ASR_SETS[key] = AsrSet(manifest, image_size)
    return _ASR_SETS[key]


def asr_for_model(model: torch.nn.Module, model_name: str, manifest: dict[str, Any] | str | Path,
                  device: str = "cpu", probe_data: ImageCaptionData | None = None, *,
                  tokenizer=None, classes: ClassInfo | None = None, seed: int = 0,
                  zeroshot_weights: torch.Tensor | None = None, probe: LinearProbe | None = None,
                  cache_eval_set: bool = False) -> dict[str, Any]:
    """Zero-shot (and, with ``probe_data`` or a fitted ``probe``, linear-probe) ASR of one model on a
    manifest's eval set. ``zeroshot_weights`` / ``probe``: the same model's classifier and fitted
    probe, when several manifests are measured in a row (they do not depend on the manifest)."""
    from clipguard.models.factory import get_tokenizer, image_size

    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest)
    elif "_dir" not in manifest:
        raise DataError("a manifest dict needs '_dir' (use clipguard.attacks.manifest.load_manifest)")
    if classes is None:
        classes = ClassInfo.load(manifest_classes_path(manifest))
    tokenizer = tokenizer or get_tokenizer(model_name)
    aset = load_asr_set(manifest, image_size(model), cache=cache_eval_set)
    n_classes = len(classes.classes)
    if int(aset.targets.max()) >= n_classes or int(aset.labels.max()) >= n_classes:
        raise DataError(f"labels/targets exceed the {n_classes} classes of classes.json", file=str(aset.path))
    ks = asr_ks(n_classes)
    keep = aset.labels != aset.targets  # the protocol: never count target-class images
    if not bool(keep.any()):
        raise DataError("no ASR image outside the target class", file=str(aset.path), field="label")
    feats_t = encode_images(model, aset.triggered.images, device)
    feats_c = encode_images(model, aset.clean.images, device) if aset.clean is not None else None
    clf = zeroshot_weights if zeroshot_weights is not None else zeroshot_classifier(model, tokenizer, classes, device)
    result: dict[str, Any] = {
        "zeroshot": _score_block(feats_t @ clf.t(), feats_c @ clf.t() if feats_c is not None else None,
                                 aset, keep, ks, classes, manifest,
                                 "zero-shot, mean of classes.json templates per class")}
    if probe is None and probe_data is not None:
        probe = fit_probe(model, probe_data, device, seed)
    if probe is not None:
        cls_ids = torch.as_tensor(probe.clf.classes_)
        full = torch.full((len(feats_t), n_classes), float("-inf"), dtype=torch.float64)
        full[:, cls_ids] = torch.from_numpy(probe.clf.predict_proba(feats_t.numpy())).double()
        full_c = None
        if feats_c is not None:
            full_c = torch.full((len(feats_c), n_classes), float("-inf"), dtype=torch.float64)
            full_c[:, cls_ids] = torch.from_numpy(probe.clf.predict_proba(feats_c.numpy())).double()
        lp = _score_block(full, full_c, aset, keep, ks, classes, manifest,
                          f"logistic regression on clean features of {probe.source} ({probe.n_train} images), "
                          f"{probe.describe()}")
        result["linear_probe"] = lp
    result["attack"] = manifest["attack"]
    result["kind"] = aset.kind
    result["manifest"] = str(Path(manifest["_dir"]) / "manifest.json")
    return result


def attack_metrics(checkpoint: str | Path, manifest_path: str | Path, *, model_name: str | None = None,
                   device: str = "cpu", probe_csv: str | Path | None = None, seed: int = 0,
                   probe: bool = True) -> dict[str, Any]:
    """ASR of a checkpoint. The linear probe is fitted on ``probe_csv``, by default the clean
    training CSV the manifest was made from (``source_csv``) when it still exists."""
    from clipguard.evaluation.runner import load_model
    from clipguard.models.factory import image_size

    torch.manual_seed(seed)
    manifest = load_manifest(manifest_path)
    model, name = load_model(checkpoint, model_name, device)
    probe_data = None
    if probe:
        src = Path(probe_csv) if probe_csv else Path(manifest["source_csv"])
        if src.is_file():
            data = load_csv(src, manifest_csv_spec(manifest), image_size=image_size(model))
            if bool((data.labels >= 0).all()):
                probe_data = data
    out = asr_for_model(model, name, manifest, device, probe_data, seed=seed)
    out["checkpoint"] = str(checkpoint)
    return out


def manifest_csv_spec(manifest: dict[str, Any]) -> CsvSpec:
    """The CSV conventions the poisoned dataset was written with (recorded in its manifest)."""
    c = manifest.get("csv") or {}
    return CsvSpec(img_key=c.get("img_key", "filepath"), caption_key=c.get("caption_key", "title"),
                   label_key=c.get("label_key") or "label", separator=c.get("separator", "\t"),
                   allow_outside_root=bool(c.get("allow_outside_root", False)))
