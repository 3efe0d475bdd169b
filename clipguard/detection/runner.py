"""``clipguard scan``: encode a dataset once, score every pair with each detector, and write what
to train on.

``scan`` is the whole command (load, encode, score, write DIR); ``scan_features`` is the part
that needs no files (features in, scores, keep masks and metrics out), for callers that already
hold a model's embeddings, such as the bench.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from clipguard.detection.base import (
    Detector,
    DetectorOptions,
    KeepDecision,
    PairFeatures,
    build,
    default_detectors,
    fraction_keep,
    get,
    missing_reference,
    veto_keep,
    within_keep,
)
from clipguard.detection.search import NeighbourSearch, import_faiss
from clipguard.errors import ConfigError, DataError

DEFAULT_KEEP = "dao"


# ---------------------------------------------------------------------------- settings
def parse_detector_options(items: Iterable[str] | None) -> dict[str, dict[str, str]]:
    """``["dao.k=32", "lid.space=text"]`` -> ``{"dao": {"k": "32"}, "lid": {"space": "text"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, eq, value = str(item).partition("=")
        name, dot, opt = key.strip().partition(".")
        if not eq or not dot or not name or not opt.strip():
            raise ConfigError(f"--detector-option {item!r}: expected DETECTOR.KEY=VALUE, e.g. dao.k=32")
        out.setdefault(name, {})[opt.strip()] = value.strip()
    return out


def detector_names(entries: str | Sequence[str] | None) -> list[str]:
    """Detector names from repeatable, comma-separated flag values, in order, each once."""
    if isinstance(entries, str):
        entries = [entries]
    out: list[str] = []
    for entry in entries or ():
        for name in str(entry).split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out


def resolve_detectors(detectors: str | Sequence[str] | None = None,
                      options: dict[str, dict[str, Any] | DetectorOptions] | None = None,
                      also: Sequence[str] = (), reference: bool = False) -> list[Detector]:
    """Built detectors, in the order given (default: every registered one that runs unnamed,
    those that compare with a reference model only when ``reference``), then any of ``also`` (veto detectors) not
    among them; options are checked against each detector's dataclass, and options for a detector
    not run are refused, as is a detector that needs a reference model when none is given."""
    chosen = detector_names([*(detector_names(detectors) or default_detectors(reference)), *detector_names(also)])
    if not chosen:
        raise ConfigError("no detector given")
    options = dict(options or {})
    for name in options:
        if name not in chosen:
            get(name)  # an unknown name gets the registry's message, with the choices
            raise ConfigError(f"--detector-option for '{name}', which is not among the detectors run "
                              f"({', '.join(chosen)})")
    built = [build(name, options.get(name)) for name in chosen]
    needing = [d.name for d in built if d.needs_reference]
    if needing and not reference:
        raise missing_reference(needing[0])
    return built


def default_keep_detector(detectors: Sequence[Detector], explicit: bool) -> str:
    """The first detector given, or ``dao`` when running the default set."""
    names_run = [d.name for d in detectors]
    if not explicit and DEFAULT_KEEP in names_run:
        return DEFAULT_KEEP
    return names_run[0]


# ---------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_pairs(model: torch.nn.Module, tokenizer, data, *, device: str | torch.device = "cpu",
                 batch_size: int = 256, progress: bool = True, search: NeighbourSearch | None = None,
                 pixels: bool = False, residuals: bool = False) -> PairFeatures:
    """Normalised image and caption embeddings of every pair (one pass, batch by batch, so lazy
    images and captions are never held all at once in model input form); with ``pixels``, the
    images' coarse pixel signatures too, from the same decoded batch; with ``residuals``, their
    high-passed pixels."""
    from tqdm.auto import tqdm

    from clipguard.data.signatures import pixel_residuals, pixel_signatures
    from clipguard.evaluation.features import encode_images, encode_tokens

    dev = torch.device(device)
    n = len(data)
    img, txt, sig, res = [], [], [], []
    with tqdm(total=n, desc="encode", unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(n, i + batch_size))
            batch = data.images[idx]
            img.append(encode_images(model, batch, dev, batch_size=batch_size))
            txt.append(encode_tokens(model, tokenizer(data.captions[i:i + batch_size]), dev, batch_size))
            if pixels:
                sig.append(pixel_signatures(batch))
            if residuals:
                res.append(pixel_residuals(batch))
            bar.update(len(idx))
    return PairFeatures(torch.cat(img), torch.cat(txt), device=dev, search=search or NeighbourSearch(),
                        pixels=torch.cat(sig) if pixels else None, residuals=torch.cat(res) if residuals else None)


def needs_residuals(detectors: Sequence[Detector]) -> bool:
    """Whether a detector reads the images' high-passed pixels (only then are they computed)."""
    return any(d.needs_residuals for d in detectors)


def needs_pixels(detectors: Sequence[Detector]) -> bool:
    """Whether a detector searches the pixel signatures (only then are they computed)."""
    return any(getattr(d.opt, "space", None) == "pixels" for d in detectors)


# ---------------------------------------------------------------------------- scoring
@dataclass
class DetectorRun:
    """One detector's scores and what its keep rule decided."""

    detector: Detector
    scores: np.ndarray
    keep: KeepDecision
    seconds: float       # its own work (the shared neighbour search is counted in knn_seconds)
    knn_seconds: float   # the neighbour search it reads (shared with the detectors on that space)
    metrics: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.detector.name

    def ranks(self) -> np.ndarray:
        """1 = most suspicious; equal scores: the earlier pair first."""
        order = np.argsort(-self.scores, kind="stable")
        r = np.empty(len(order), dtype=np.int64)
        r[order] = np.arange(1, len(order) + 1)
        return r

    def summary(self, n: int, poisoned: np.ndarray | None) -> dict[str, Any]:
        total = self.seconds + self.knn_seconds
        out: dict[str, Any] = {
            "options": self.detector.opt.to_dict(), "seconds": self.seconds, "knn_seconds": self.knn_seconds,
            "pairs_per_s": n / total if total > 0 else None,
            "keep": {**self.keep.rule, "kept": self.keep.kept, "kept_fraction": self.keep.kept / n if n else None},
        }
        if poisoned is not None:
            out["keep"]["poisons_kept"] = int((self.keep.mask & poisoned).sum())
        if self.metrics is not None:
            out["metrics"] = self.metrics
        return out


@dataclass
class ScanResult:
    runs: list[DetectorRun]
    keep_detector: str
    keep: KeepDecision                     # the mask kept.csv is written from
    poisoned: np.ndarray | None = None
    parts: dict[str, np.ndarray] = field(default_factory=dict)

    def run(self, name: str) -> DetectorRun:
        return next(r for r in self.runs if r.name == name)


def check_vetoes(vetoes: str | Sequence[str], keep_detector: str, run: Sequence[str]) -> list[str]:
    """The veto detectors' names (flag values, as ``detector_names`` reads them), checked: each is
    run and none is the keep detector."""
    out = detector_names(vetoes)
    for name in out:
        if name == keep_detector:
            raise ConfigError(f"--veto-detector '{name}' is the keep detector; a veto must be another detector")
        if name not in run:
            raise ConfigError(f"--veto-detector '{name}' is not among the detectors run ({', '.join(run)})")
    return out


def scan_features(features: PairFeatures, detectors: Sequence[Detector], *, keep_detector: str | None = None,
                  keep_fraction: float | None = None, veto_detectors: Sequence[str] = (),
                  poisoned: np.ndarray | torch.Tensor | None = None,
                  parts: dict[str, Any] | None = None, progress: bool = True) -> ScanResult:
    """Score ``features`` with each detector; keep by ``keep_detector``'s rule (or the
    ``keep_fraction`` of lowest scores), minus the pairs each of ``veto_detectors`` rejects by its
    own rule; with ``poisoned`` (a mask), detection metrics overall and per ``parts`` (name ->
    mask of that part's poisons)."""
    from tqdm.auto import tqdm

    from clipguard.detection.metrics import grouped_metrics

    keep_detector = keep_detector or default_keep_detector(detectors, explicit=True)
    if keep_detector not in [d.name for d in detectors]:
        raise ConfigError(f"--keep-detector '{keep_detector}' is not among the detectors run "
                          f"({', '.join(d.name for d in detectors)})")
    vetoes = check_vetoes(veto_detectors, keep_detector, [d.name for d in detectors])
    if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
        raise ConfigError(f"--keep-fraction must be in (0, 1], got {keep_fraction}")
    n = len(features)
    mask = None if poisoned is None else np.asarray(poisoned).astype(bool).reshape(-1)
    part_masks = {k: np.asarray(v).astype(bool).reshape(-1) for k, v in (parts or {}).items()}
    runs = []
    for det in tqdm(detectors, desc="detectors", unit="detector", disable=not progress, dynamic_ncols=True):
        before = features.search_seconds()
        t0 = time.perf_counter()
        scores = det.scores(features)
        wall = time.perf_counter() - t0
        searched = features.search_seconds() - before
        if len(scores) != n:
            raise RuntimeError(f"detector '{det.name}' gave {len(scores)} scores for {n} pairs")
        knn_s = det.search_cost(features)
        run = DetectorRun(det, scores, det.keep_rule(scores), max(0.0, wall - searched), knn_s)
        if mask is not None:
            run.metrics = grouped_metrics(scores, mask, part_masks or None)
        runs.append(run)
    by_name = {r.name: r for r in runs}
    chosen = by_name[keep_detector]
    keep = fraction_keep(chosen.scores, keep_fraction) if keep_fraction is not None else chosen.keep
    if vetoes:
        keep = veto_keep(keep, {name: by_name[name].keep for name in vetoes})
    return ScanResult(runs, keep_detector, keep, mask, part_masks)


def rank_shares(scores: np.ndarray) -> np.ndarray:
    """Each pair's rank among all pairs as a share in (0, 1] (1: the highest score; ties share
    their mean rank), so that scores of different models are on one scale."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    return rankdata(s, method="average") / max(1, len(s))


COMBINE_RULES = ("mean", "max")  # how several models' rank shares become one score


def check_combine(combine: str) -> None:
    if combine not in COMBINE_RULES:
        raise ConfigError(f"--combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")


def scan_models(features: Iterable[PairFeatures], detectors: Sequence[Detector], *, keep_detector: str,
                keep_fraction: float | None, veto_detectors: Sequence[str] = (),
                poisoned: np.ndarray | None = None, parts: dict[str, Any] | None = None,
                progress: bool = True, combine: str = "mean") -> tuple[ScanResult, list[ScanResult]]:
    """``scan_features`` on one model's features, or on several models' (taken one at a time, so
    only one model's features need be held) combined by ``combine_results``; also returns each
    model's own scan."""
    per_model = [scan_features(f, detectors, keep_detector=keep_detector, keep_fraction=keep_fraction,
                               veto_detectors=veto_detectors, poisoned=poisoned, parts=parts, progress=progress)
                 for f in features]
    if len(per_model) == 1:
        return per_model[0], per_model
    return combine_results(per_model, keep_fraction=keep_fraction, veto_detectors=veto_detectors,
                           poisoned=poisoned, parts=parts, combine=combine), per_model


def combine_results(results: Sequence[ScanResult], *, keep_fraction: float | None = None,
                    veto_detectors: Sequence[str] = (), poisoned: np.ndarray | None = None,
                    parts: dict[str, np.ndarray] | None = None, combine: str = "mean") -> ScanResult:
    """One scan from the scans of several models of the same pairs (the same detectors, in order):
    each detector's score is the mean (``combine="max"``: the largest) of its rank shares under
    every model, and its own rule keeps a pair only if it keeps it under every model. Two models
    seldom share a blind spot: a model trained on a small trusted set confuses some classes, one
    cleaned from the poisoned model may keep part of a trigger. The mean lets a pair one model
    ranks high and the other low fall in between; the max keeps a pair only if every model ranks
    it low, so a model blind to one attack cannot outvote the other."""
    from clipguard.detection.metrics import grouped_metrics

    check_combine(combine)
    reduce = np.mean if combine == "mean" else np.max
    first = results[0]
    if any([r.name for r in res.runs] != [r.name for r in first.runs] for res in results):
        raise ValueError("combine_results: every scan must run the same detectors in the same order")
    runs = []
    for i, r0 in enumerate(first.runs):
        per = [res.runs[i] for res in results]
        scores = reduce([rank_shares(p.scores) for p in per], axis=0)
        mask = np.logical_and.reduce([p.keep.mask for p in per])
        keep = KeepDecision(mask, {"rule": "every_model", "models": [p.keep.rule for p in per]})
        run = DetectorRun(r0.detector, scores, keep, sum(p.seconds for p in per), sum(p.knn_seconds for p in per))
        if poisoned is not None:
            run.metrics = grouped_metrics(scores, poisoned, parts or None)
        runs.append(run)
    by_name = {r.name: r for r in runs}
    chosen = by_name[first.keep_detector]
    keep = fraction_keep(chosen.scores, keep_fraction) if keep_fraction is not None else chosen.keep
    vetoes = check_vetoes(veto_detectors, first.keep_detector, list(by_name))
    if vetoes:
        keep = veto_keep(keep, {name: by_name[name].keep for name in vetoes})
    return ScanResult(runs, first.keep_detector, keep, poisoned, dict(parts or {}))


# ---------------------------------------------------------------------------- manifest
def manifest_masks(manifest: str | Path, data) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Poison mask over ``data``, one mask per attack part (trigger) when the manifest records
    several, and the manifest itself."""
    from clipguard.attacks.manifest import load_manifest, poison_mask

    m = load_manifest(manifest)
    poisoned = poison_mask(m, data).numpy()
    triggers = m.get("poison_triggers")
    parts: dict[str, np.ndarray] = {}
    rows = [int(r) for r in m["poisoned_rows"]]
    if isinstance(triggers, list) and len(triggers) == len(rows):
        names_by_row = {r: (str(t) or str(m["attack"])) for r, t in zip(rows, triggers)}
        if len(set(names_by_row.values())) > 1:
            lines = data.rows if data.rows else [i + 2 for i in range(len(data))]
            for part in dict.fromkeys(names_by_row.values()):
                parts[part] = np.array([names_by_row.get(line - 2) == part for line in lines], dtype=bool)
    return poisoned, parts, m


# ---------------------------------------------------------------------------- the command
def scan(data: str | Path, checkpoint: str | Path | Sequence[str | Path], out: str | Path, *, model: str | None = None,
         detectors: str | Sequence[str] | None = None,
         options: dict[str, dict[str, Any] | DetectorOptions] | None = None,
         attack_manifest: str | Path | None = None, keep_fraction: float | None = None,
         keep_detector: str | None = None, veto_detectors: Sequence[str] = (), top: int = 100, overwrite: bool = False, device: str = "auto",
         batch_size: int = 256, spec=None, dataset_type: str = "auto", lazy_images: bool = False,
         limit: int | None = None, skip_bad_rows: bool = False, chunk: int = 4096,
         progress: bool = True, combine: str = "mean", reference: str | Path | None = None,
         within: str | Path | None = None, search: NeighbourSearch | dict[str, Any] | None = None) -> dict[str, Any]:
    """Find suspicious pairs of ``data`` with ``checkpoint``'s embeddings; write ``out``.

    ``within``: the folder of an earlier scan of the same data; only the pairs it kept can be
    kept here (its ``scores.csv``, matched row by row).

    ``search``: how neighbours are found (``NeighbourSearch`` or its fields as a dict: exact, the
    default, in blocks of ``chunk`` query rows; or ``method: ivf``, approximate with faiss, its
    recall measured on a sample and written to scan.json).

    ``reference``: a model trained without this data (e.g. on a small trusted set) for the
    detectors that compare the scanned model with one (``shift``); it encodes the pairs once.

    ``checkpoint`` may be a list: every model encodes the pairs, each detector scores them under
    each model, and the scores written are the mean (``combine="max"``: the largest) of the rank
    shares (``combine_results``).

    Writes ``out/scores.csv`` (every pair's score and rank per detector), ``out/kept.csv`` (the
    pairs the keep detector keeps, in the input's columns and separator, images hard-linked
    beside it), ``out/suspicious.csv`` (the ``top`` highest-scoring pairs), ``out/scan.json``
    (returned) and, with ``attack_manifest``, detection metrics and plots. Everything is checked
    before the model runs; an existing ``out/scan.json`` needs ``overwrite``.
    """
    from clipguard.data.csv_dataset import CsvSpec, check_limit
    from clipguard.data.registry import infer_type, load_dataset
    from clipguard.detection import outputs
    from clipguard.evaluation.runner import load_model
    from clipguard.models.device import resolve_device
    from clipguard.models.factory import image_size

    # ---- every setting first: a typo costs nothing
    dets = resolve_detectors(detectors, options, also=veto_detectors, reference=reference is not None)
    keep_name = keep_detector or default_keep_detector(dets, explicit=detectors is not None)
    if keep_name not in [d.name for d in dets]:
        raise ConfigError(f"--keep-detector '{keep_name}' is not among the detectors run "
                          f"({', '.join(d.name for d in dets)})")
    vetoes = check_vetoes(veto_detectors, keep_name, [d.name for d in dets])
    if keep_fraction is not None and not (math.isfinite(keep_fraction) and 0.0 < keep_fraction <= 1.0):
        raise ConfigError(f"--keep-fraction must be in (0, 1], got {keep_fraction}")
    if top < 0:
        raise ConfigError(f"--top must be >= 0, got {top}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if chunk < 1:
        raise ConfigError(f"--chunk must be >= 1, got {chunk}")
    if not isinstance(search, NeighbourSearch):
        search = NeighbourSearch.from_dict({"chunk": chunk, **(search or {})}, where="--neighbour-search")
    if search.method == "ivf":
        import_faiss()  # a missing optional dependency fails before the model loads
    check_combine(combine)
    check_limit(limit)
    spec = spec or CsvSpec()
    kind = infer_type(str(data)) if dataset_type == "auto" else dataset_type
    if kind == "csv" and not Path(data).is_file():
        raise DataError("file not found", file=str(data))
    if within is not None and Path(within).resolve() == Path(out).resolve():
        raise ConfigError(f"--within {within} is the --out of this scan; give another --out")
    out = outputs.check_out(out, overwrite, data if kind == "csv" else None)
    earlier = read_kept(within) if within is not None else None
    dev = resolve_device(device)
    if attack_manifest is not None:
        from clipguard.attacks.manifest import load_manifest

        load_manifest(attack_manifest)  # a missing or broken manifest fails before the model loads

    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not checkpoints:
        raise ConfigError("--checkpoint: give at least one model")
    if combine != "mean" and len(checkpoints) < 2:
        raise ConfigError(f"--combine {combine}: combines the scores of several models; give --checkpoint twice or more")

    # ---- models, data, embeddings
    models = [load_model(c, model, str(dev)) for c in checkpoints]
    ref = load_model(reference, model, str(dev)) if reference is not None else None
    sizes = {image_size(net) for net, _ in [*models, *([ref] if ref is not None else [])]}
    if len(sizes) > 1:
        raise ConfigError(f"--checkpoint{' and --reference' if ref is not None else ''}: the models take images "
                          f"of different sizes ({sorted(sizes)}); scan with models of one image size")
    net, model_name = models[0]
    pairs = load_dataset(str(data), kind, spec=spec, image_size=image_size(net), skip_bad_rows=skip_bad_rows,
                         limit=limit, lazy=lazy_images)
    hint_search(search, len(pairs), dev)
    sources: dict[str, Any] = {"data": str(data), "checkpoint": str(checkpoints[0])}
    if len(checkpoints) > 1:
        sources["checkpoints"] = [str(c) for c in checkpoints]
    if reference is not None:
        sources["reference"] = str(reference)
    within_mask = None
    if earlier is not None:
        within_mask = match_kept(earlier, outputs.row_ids(pairs, kind), Path(within))
        sources["within"] = str(within)
    summary, _ = scan_pairs(pairs, net, model_name, out, dets, keep_detector=keep_name, keep_fraction=keep_fraction,
                            veto_detectors=vetoes, within=(str(within), within_mask) if within_mask is not None else None,
                            attack_manifest=attack_manifest, kind=kind, spec=spec, top=top, device=dev,
                            batch_size=batch_size, search=search, progress=progress,
                            sources=sources, more_models=models[1:], combine=combine, reference_model=ref)
    return summary


EXACT_HINT_PAIRS = 250_000  # above this, an exact search on a CPU runs for many minutes


def hint_search(search: NeighbourSearch, n: int, device: torch.device) -> None:
    """Say, before a long exact search on a CPU, that an approximate one exists."""
    if search.method == "exact" and device.type == "cpu" and n >= EXACT_HINT_PAIRS:
        logging.getLogger("clipguard").warning(
            "%d pairs: the exact neighbour search on the CPU grows with the square of the pairs (about an hour "
            "for a million on 2 cores); --neighbour-search ivf finds them approximately in minutes, with its "
            "recall measured (pip install 'clipguard[ann]'), or run on a GPU with --device cuda", n)


def scan_pairs(pairs, net: torch.nn.Module, model_name: str, out: Path, dets: Sequence[Detector], *,
               keep_detector: str, keep_fraction: float | None, attack_manifest: str | Path | None, kind: str,
               veto_detectors: Sequence[str] = (),
               spec, top: int, device: torch.device, batch_size: int = 256,
               search: NeighbourSearch | None = None, progress: bool = True, sources: dict[str, Any],
               more_models: Sequence[tuple[torch.nn.Module, str]] = (),
               combine: str = "mean",
               reference_model: tuple[torch.nn.Module, str] | None = None,
               within: tuple[str, np.ndarray] | None = None) -> tuple[dict[str, Any], ScanResult]:
    """The part of ``scan`` after loading: encode ``pairs`` with ``net``, score, write ``out``
    (checked beforehand by the caller), and return scan.json's record with the full result (its
    keep mask is what a retraining step trains on). ``more_models``: (model, name) pairs that
    score the pairs too; the scores written then combine every model's (``combine_results``).
    ``reference_model``: (model, name) whose features every scanned model's carry as their
    ``reference`` (encoded once). ``within``: (source, mask) of the pairs an earlier scan kept;
    the keep decision is limited to them."""
    import clipguard
    from clipguard.detection import outputs
    from clipguard.models.factory import get_tokenizer

    poisoned, parts, manifest = (manifest_masks(attack_manifest, pairs) if attack_manifest is not None
                                 else (None, {}, None))
    encode_s = 0.0
    models = [(net, model_name), *more_models]
    del net

    def encode(m: torch.nn.Module, name: str, pixels: bool, residuals: bool = False) -> PairFeatures:
        """One model's features of the pairs, its time counted in ``encode_s``."""
        nonlocal encode_s
        t0 = time.perf_counter()
        features = encode_pairs(m, get_tokenizer(name), pairs, device=device, batch_size=batch_size,
                                progress=progress, search=search, pixels=pixels,
                                residuals=residuals)
        encode_s += time.perf_counter() - t0
        return features

    ref_features = encode(*reference_model, pixels=False) if reference_model is not None else None

    searched: list[dict[str, dict]] = []  # each model's neighbour searches, once it has been scored

    def encoded():
        for m, name in models:
            features = encode(m, name, pixels=needs_pixels(dets), residuals=needs_residuals(dets))
            features.reference = ref_features
            yield features
            searched.append(features.searches())

    result, per_model = scan_models(encoded(), dets, keep_detector=keep_detector, keep_fraction=keep_fraction,
                                    veto_detectors=veto_detectors, poisoned=poisoned, parts=parts,
                                    progress=progress, combine=combine)
    if within is not None:
        result.keep = within_keep(result.keep, within[1], within[0])

    # ---- outputs (scan.json last: it marks a finished scan)
    n = len(pairs)
    files = outputs.write_all(out, pairs, result, kind=kind, spec=spec, top=top)
    summary: dict[str, Any] = {
        **sources, "dataset_type": kind, "model": model_name,
        **({"reference_model": reference_model[1]} if reference_model is not None else {}),
        "device": str(device), "n_pairs": n, "skipped_rows": pairs.skipped,
        "encode": {"seconds": encode_s, "pairs_per_s": n / encode_s if encode_s > 0 else None,
                   "batch_size": batch_size},
        "detectors": {r.name: r.summary(n, poisoned) for r in result.runs},
        "neighbour_search": {"method": (search or NeighbourSearch()).method,
                             "searches": searched[0] if len(searched) == 1 else searched},
        **({"models": [model_name, *(name for _, name in more_models)],
            "combined": f"each detector's score: the {'mean' if combine == 'mean' else 'largest'} of its rank "
                        "shares under every model; its own rule keeps a pair only if it keeps it under every model",
            "combine": combine} if more_models else {}),
        "keep": {"detector": result.keep_detector, **result.keep.rule, "kept": result.keep.kept,
                 "kept_fraction": result.keep.kept / n, "file": files.get("kept")},
    }
    if more_models and poisoned is not None:  # what each model alone would have scored
        for r in result.runs:
            summary["detectors"][r.name]["per_model"] = [res.run(r.name).metrics for res in per_model]
    if poisoned is not None:
        summary["keep"]["poisons_kept"] = int((result.keep.mask & poisoned).sum())
        summary["attack_manifest"] = str(Path(manifest["_dir"]) / "manifest.json")
        summary["attack"] = manifest.get("attack")
        summary["n_poisoned"] = int(poisoned.sum())
        summary["parts"] = {k: int(v.sum()) for k, v in parts.items()} or None
    summary["files"] = files
    summary["clipguard_version"] = clipguard.__version__
    outputs.write_summary(out, summary)
    return summary, result


def read_kept(folder: str | Path) -> tuple[list[int], np.ndarray]:
    """The row ids and kept flags of a finished scan in ``folder`` (its ``scores.csv``)."""
    import csv

    folder = Path(folder)
    scores = folder / "scores.csv"
    if not (folder / "scan.json").is_file() or not scores.is_file():
        raise DataError("not a finished scan (no scan.json and scores.csv); give the --out of an earlier "
                        "`clipguard scan`", file=str(folder))
    ids: list[int] = []
    kept: list[bool] = []
    with open(scores, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"row", "kept"} <= set(reader.fieldnames or []):
            raise DataError("needs the columns row and kept", file=str(scores))
        for i, r in enumerate(reader):
            try:
                ids.append(int(r["row"]))
                kept.append(bool(int(r["kept"])))
            except (TypeError, ValueError):
                raise DataError(f"row or kept is not a whole number: {r.get('row')!r}, {r.get('kept')!r}",
                                file=str(scores), row=i + 2, field="row/kept") from None
    return ids, np.asarray(kept, dtype=bool)


def match_kept(earlier: tuple[list[int], np.ndarray], ids: list[int], folder: Path) -> np.ndarray:
    """The earlier scan's kept flags in this data's row order; an error unless it scanned the same rows."""
    rows, kept = earlier
    if rows != list(ids):
        raise ConfigError(f"--within {folder}: that scan read {len(rows)} rows, this one {len(ids)}"
                          + ("" if len(rows) != len(ids) else " (other row numbers)")
                          + "; give the scan of the same data, with the same --limit")
    return kept
