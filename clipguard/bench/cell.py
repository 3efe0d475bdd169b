"""One cell of the grid: train (or resume) a model, evaluate it, write one JSON.

The JSON holds everything a table needs (clean accuracy, every attack part's ASR with its
protocol, the defence's per-epoch diagnostics, similarity histograms) plus the exact config and a
fingerprint of it, so a re-run can tell a finished cell from a stale one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import clipguard
from clipguard.bench.cache import BenchCache
from clipguard.bench.config import AttackSpec, BenchConfig, DefenseSpec
from clipguard.bench.plan import Cell, base_cell, detect_base_cells, reference_cell, within_cell
from clipguard.errors import ConfigError
from clipguard.io import read_jsonl, write_json
from clipguard.models import checkpoint as ckpt
from clipguard.training.spec import RunSpec, fingerprint, resolve_spec

CELL_FORMAT = 2  # 2: the fingerprint hashes the resolved run (defaults filled in)


def entry_spec(cfg: BenchConfig, stage: str, entry: DefenseSpec, seed: int) -> RunSpec:
    """A grid entry's RunSpec: library defaults < grid model/device/seed < preset < stage < entry."""
    stage_spec = cfg.pretrain if stage == "pretrain" else cfg.finetune
    return resolve_spec(stage=stage, defense=entry.defense, preset=entry.preset, options=entry.options,
                        base={"model": cfg.model, "device": cfg.device, "seed": seed,
                              **({} if cfg.trim_text is None else {"trim_text": cfg.trim_text})},
                        train=[stage_spec.train, entry.train],
                        where=f"{cfg.source}: {stage}.defenses.{entry.label}")


def cell_spec(cfg: BenchConfig, cell: Cell) -> RunSpec:
    return entry_spec(cfg, cell.stage, cell.defense, cell.seed)


def cell_config(cfg: BenchConfig, cell: Cell) -> dict[str, Any]:
    """Everything that determines the cell's result (and nothing that does not, e.g. --out): the
    resolved run, so writing a default out explicitly in the YAML keeps the cached result."""
    from clipguard.bench import detect

    ds = asdict(cell.dataset)
    conf: dict[str, Any] = {
        "format": CELL_FORMAT,
        "dataset": ds, "attack": {"label": cell.attack.label, "parts": [asdict(p) for p in cell.attack.parts]},
        "label": cell.defense.label, "seed": cell.seed, "split": cfg.split,
    }
    if cell.stage == "scan":  # nothing trains: the detectors and the base model decide the result
        ref = reference_cell(cfg, cell)
        conf["scan"] = {**detect.scan_conf(cfg.scan, reference=ref is not None), "base": {
            "method": cell.base, "fingerprint": fingerprint(cell_config(cfg, base_cell(cfg, cell)))}}
        if ref is not None:
            conf["scan"]["reference"] = {"method": ref.method, "fingerprint": fingerprint(cell_config(cfg, ref))}
        if cfg.neighbour_search:  # only when given: exact-search cells keep their fingerprints
            conf["scan"]["neighbour_search"] = cfg.neighbour_search
        return conf
    conf["run"] = cell_spec(cfg, cell).resolved()
    if cell.defense.data != "train":
        conf["train_data"] = cell.defense.data
    if cell.stage == "finetune":
        conf["finetune_data"] = cfg.finetune.data
        conf["base"] = {"method": cell.base, "fingerprint": fingerprint(cell_config(cfg, base_cell(cfg, cell)))}
    if cell.defense.detect is not None:
        base, *more = detect_base_cells(cfg, cell)
        conf["detect"] = {**detect.detect_conf(cell.defense.detect), "base": {
            "method": base.method, "fingerprint": fingerprint(cell_config(cfg, base))}}
        if more:  # only when given: entries with one base keep their finished cells
            conf["detect"]["more_bases"] = [{"method": b.method, "fingerprint": fingerprint(cell_config(cfg, b))}
                                            for b in more]
        ref = reference_cell(cfg, cell)
        if ref is not None:
            conf["detect"]["reference"] = {"method": ref.method, "fingerprint": fingerprint(cell_config(cfg, ref))}
        within = within_cell(cfg, cell)
        if within is not None:
            conf["detect"]["within"] = {"method": within.method, "fingerprint": fingerprint(cell_config(cfg, within))}
        if cfg.neighbour_search:
            conf["detect"]["neighbour_search"] = cfg.neighbour_search
    return conf


def read_cell(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_done(cfg: BenchConfig, cell: Cell, out: Path) -> bool:
    """A cell is finished when its JSON exists with the same config fingerprint; a JSON from a
    different config is an error, not something to silently overwrite or mix into tables."""
    rec = read_cell(cell.json_path(out))
    if rec is None:
        return False
    fp = fingerprint(cell_config(cfg, cell))
    if rec.get("fingerprint") != fp:
        raise ConfigError(f"{cell.json_path(out)}: finished with a different config than {cfg.source} "
                          f"(fingerprint {rec.get('fingerprint')} != {fp}); use a new --out, or --redo to retrain it")
    return True


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def similarity_histogram(model, model_name: str, data, mask: torch.Tensor | None, device,
                         bins: int, max_pairs: int = 20000, seed: int = 0) -> dict[str, Any]:
    """Cosine similarity of training pairs under the final model, clean vs poisoned (SafeCLIP
    Fig. 2/4): shows whether the defence kept poisoned pairs apart. Every poisoned pair is kept;
    clean pairs are a seeded sample when the data has more than ``max_pairs``."""
    from clipguard.evaluation.features import encode_images, encode_tokens
    from clipguard.models.factory import get_tokenizer

    mask = mask if mask is not None else torch.zeros(len(data), dtype=torch.bool)
    sampled = len(data) > max_pairs
    if sampled:
        clean_idx = (~mask).nonzero().flatten()
        g = torch.Generator().manual_seed(seed)
        keep = clean_idx[torch.randperm(len(clean_idx), generator=g)[: max(max_pairs - int(mask.sum()), 0)]]
        idx = torch.cat([keep, mask.nonzero().flatten()]).sort().values
        data, mask = data.subset(idx), mask[idx]
    img = encode_images(model, data.images, device)
    txt = encode_tokens(model, get_tokenizer(model_name)(data.captions), device)
    sims = (img * txt).sum(1)
    edges = torch.linspace(-1, 1, bins + 1)

    def hist(x: torch.Tensor) -> dict[str, Any]:
        counts = torch.histc(x, bins=bins, min=-1, max=1).long().tolist() if len(x) else [0] * bins
        return {"n": len(x), "mean": round(float(x.mean()), 5) if len(x) else None, "counts": counts}

    return {"edges": [round(float(e), 4) for e in edges], "clean": hist(sims[~mask]), "poisoned": hist(sims[mask]),
            "clean_sampled": sampled}


def asr_metrics(model, model_name: str, manifests: list[Path], device, probe, seed: int = 0
                ) -> list[dict[str, Any]]:
    """Every attack part's ASR; ``probe`` is the FITTED linear probe (or None: no linear-probe ASR)."""
    if not manifests:
        return []
    from clipguard.attacks.manifest import load_manifest
    from clipguard.data.classes import ClassInfo
    from clipguard.evaluation.asr import asr_for_model, manifest_classes_path
    from clipguard.evaluation.zeroshot import zeroshot_classifier
    from clipguard.models.factory import get_tokenizer
    from clipguard.reporting.asr_keys import pick_base_rate, pick_headline, pick_linear_probe

    # the classifier and the probe depend on the model and the classes, not on the attack: one each
    weights: dict[str, torch.Tensor] = {}
    out = []
    for i, m in enumerate(manifests):
        manifest = load_manifest(m)
        cpath = str(manifest_classes_path(manifest))
        classes = ClassInfo.load(cpath)
        if cpath not in weights:
            weights[cpath] = zeroshot_classifier(model, get_tokenizer(model_name), classes, device)
        raw = asr_for_model(model, model_name, manifest, device, classes=classes, seed=seed,
                            zeroshot_weights=weights[cpath], probe=probe, cache_eval_set=True)
        kind = raw.get("kind") or (manifest.get("eval") or {}).get("kind", "backdoor")
        out.append({"part": i, "attack": manifest.get("attack"), "kind": kind,
                    "target": manifest.get("target"), "manifest": str(m),
                    "n_poisoned": len(manifest.get("poisoned_rows", [])),
                    "headline": pick_headline(raw, kind), "linear_probe": pick_linear_probe(raw, kind),
                    "base_rate": pick_base_rate(raw),
                    "metrics": raw})
    return out


def reference_asr(cfg: BenchConfig, cell: Cell, cache: BenchCache, model, device, probe,
                  attacks: list[AttackSpec] | None = None) -> list[dict[str, Any]]:
    """A model trained on CLEAN data, measured with every poisoned attack's trigger set of the same
    dataset and seed (or those of ``attacks``): the rate at which an unpoisoned model already sends
    those images to the target class, i.e. the floor an ASR is read against ("base rate")."""
    attacks = [a for a in cfg.attacks if not a.clean] if attacks is None else attacks
    manifests = [m for a in attacks for m in cache.poisoned(cell.dataset, a, cell.seed).manifests]
    out = asr_metrics(model, cfg.model, manifests, device, probe, seed=cell.seed)
    for rec, col in zip(out, [c for a in attacks for c in attack_columns(a, cfg.attacks)]):
        rec["column"] = col
        rec["reference"] = True  # an unpoisoned model: its "ASR" is the base rate
    return out


def attack_columns(attack: AttackSpec, grid: Sequence[AttackSpec] = ()) -> list[str]:
    """One ASR column per attack part: the attack's label, or the part's attack name when several
    attacks share one poisoned dataset. A part name that another attack of the ``grid`` also
    uses (the same attacks at two doses, say) becomes ``LABEL:NAME``, so the tables never pool
    two poisoned sets into one column."""
    if len(attack.parts) == 1:
        return [attack.label]
    taken = {a.label for a in grid if a.label != attack.label}
    taken |= {p.attack for a in grid if a.label != attack.label and len(a.parts) > 1 for p in a.parts}
    return [f"{attack.label}:{p.attack}" if p.attack in taken else p.attack for p in attack.parts]


# ---------------------------------------------------------------------------- running
def _check_marker(run_dir: Path, conf: dict[str, Any]) -> Path:
    marker = run_dir / "bench_cell.json"
    if marker.is_file():
        old = read_cell(marker) or {}
        if old.get("fingerprint") != fingerprint(conf):
            raise ConfigError(f"{run_dir}: holds a run of a different config (fingerprint "
                              f"{old.get('fingerprint')} != {fingerprint(conf)}); use a new --out, or --redo to retrain it")
    return marker


def _write_marker(marker: Path, cell: Cell, conf: dict[str, Any]) -> None:
    if not marker.is_file():
        with contextlib.suppress(OSError):  # several ranks may race to write the same content
            write_json(marker, {"cell": cell.id, "fingerprint": fingerprint(conf), "config": conf})


def prepare_trainer(cfg: BenchConfig, cell: Cell, out: Path, cache: BenchCache, *, quiet: bool = False,
                    bar_position: int | None = None, detection: list | None = None):
    """The cell's Trainer, its data and poison info; refuses a run folder from another config.

    A detect-then-train cell first scores its data with its base model (or reads that from its
    run folder) and trains on the kept pairs; the record is appended to ``detection``."""
    from clipguard.evaluation.detection import poison_diagnostics
    from clipguard.training.build import build_trainer

    out = Path(out)
    conf = cell_config(cfg, cell)
    run_dir = cell.run_dir(out)
    marker = _check_marker(run_dir, conf)
    data, poison = cache.train_data(cell.dataset, cell.attack, cell.seed)
    mask = poison.mask
    masks = list(poison.masks)
    if cell.defense.detect is not None:
        from clipguard.bench import detect

        _write_marker(marker, cell, conf)
        rec = detect.detection_for(cfg, cell, detect_base_cells(cfg, cell), out, cache,
                                   fingerprint=fingerprint(conf), base_fingerprint=conf["detect"]["base"]["fingerprint"],
                                   quiet=quiet)
        rows, caption_rows = detect.training_rows(rec, len(data))
        trained = torch.from_numpy(rows)
        own = torch.from_numpy(rows == caption_rows)  # a relabelled pair is no longer the attacker's pair
        captions = [data.captions[i] for i in caption_rows.tolist()]
        data = data.subset(trained)
        data.captions = captions
        mask = mask[trained] & own if mask is not None else None
        masks = [m[trained] & own for m in masks]
        if detection is not None:
            detection.append(rec)
    if cell.stage == "pretrain" and cell.defense.data == "held-aside":
        data, mask, masks = cache.finetune_clean(cell.dataset), None, []
    spec = cell_spec(cfg, cell)
    settings: dict[str, Any] = {"keep_checkpoints": 1, "quiet": quiet, "bar_position": bar_position}
    if cell.stage == "finetune":
        base = base_cell(cfg, cell)
        if not base.json_path(out).is_file():
            raise ConfigError(f"{cell.id}: base model {base.id} is not finished")
        latest = ckpt.resolve_latest(base.run_dir(out) / "checkpoints")
        if latest is None:
            raise ConfigError(f"{cell.id}: base run {base.run_dir(out)} has no checkpoint")
        settings["checkpoint"] = str(latest)
        if cfg.finetune.data == "clean":
            data, mask = cache.finetune_clean(cell.dataset), None
    spec.train = spec.train.replace(**settings)
    parts = ({f"{i}-{p.attack}": m for i, (p, m) in enumerate(zip(cell.attack.parts, masks))}
             if mask is not None and len(masks) > 1 else None)
    diag = poison_diagnostics(mask, parts) if mask is not None else None
    _write_marker(marker, cell, conf)
    evaluate = None
    if cfg.epoch_zeroshot:
        from clipguard.training.run import epoch_zeroshot

        evaluate = epoch_zeroshot(cfg.model, cache.test_data(cell.dataset), cache.classes(cell.dataset))
    return build_trainer(spec, data, run_dir, evaluate=evaluate, diagnostics=diag), data, poison


def train_data_label(cell: Cell) -> str:
    """What the cell's model trained on, for the result JSON and the tables."""
    if cell.defense.data == "held-aside":
        return "held-aside clean"
    return "clean" if cell.attack.clean else "poisoned"


def run_cell(cfg: BenchConfig, cell: Cell, out: Path, cache: BenchCache, *, quiet: bool = False,
             evaluate: bool = True, bar_position: int | None = None) -> dict[str, Any] | None:
    """Train (or resume) and, when ``evaluate`` (rank 0 under torchrun), evaluate and write the JSON."""
    from clipguard.evaluation.linear_probe import fit_probe
    from clipguard.evaluation.runner import evaluate_model
    from clipguard.training.trainer import epochs_done

    out = Path(out)
    if cell.stage == "scan":
        return run_scan_cell(cfg, cell, out, cache, quiet=quiet) if evaluate else None
    conf = cell_config(cfg, cell)
    run_dir = cell.run_dir(out)
    t0 = time.perf_counter()
    detection: list[dict[str, Any]] = []
    trainer, data, poison = prepare_trainer(cfg, cell, out, cache, quiet=quiet, bar_position=bar_position,
                                            detection=detection)
    t_data = time.perf_counter() - t0
    resumed = ckpt.resolve_latest(run_dir / "checkpoints")
    resumed_epoch = epochs_done(ckpt.read_state(resumed)) if resumed else 0
    t1 = time.perf_counter()
    trainer.fit(resume="latest")
    t_train = time.perf_counter() - t1
    if not evaluate:
        return None

    t2 = time.perf_counter()
    model = trainer.model.eval()
    device = next(model.parameters()).device
    ds = cell.dataset
    probe_data = cache.probe_data(ds)
    # one probe fit per cell, shared by the clean accuracy and every attack's linear-probe ASR
    probe = fit_probe(model, probe_data, device, cell.seed) if probe_data is not None else None
    clean = evaluate_model(model, cfg.model, cache.test_data(ds), cache.classes(ds), device=device,
                           probe_data=probe_data, probe=probe, retrieval=False, seed=cell.seed)
    metrics: dict[str, Any] = {
        "zeroshot_top1": clean["zeroshot"]["acc1"], "zeroshot_top5": clean["zeroshot"].get("acc5"),
        "n_test": clean["zeroshot"]["n_images"]}
    if "linear_probe" in clean:
        metrics.update({"linear_probe_top1": clean["linear_probe"]["acc1"],
                        "linear_probe_top5": clean["linear_probe"].get("acc5"),
                        "n_probe_train": clean["linear_probe"]["n_train"],
                        "linear_probe_C": clean["linear_probe"].get("C"),
                        "linear_probe_val_acc1": clean["linear_probe"].get("val_acc1")})
    if cell.attack.clean:
        asr = reference_asr(cfg, cell, cache, model, device, probe)
    else:
        asr = asr_metrics(model, cfg.model, poison.manifests, device, probe, seed=cell.seed)
        for rec, col in zip(asr, attack_columns(cell.attack, cfg.attacks)):
            rec["column"] = col
    train_data, _ = cache.train_data(cell.dataset, cell.attack, cell.seed)
    hist = similarity_histogram(model, cfg.model, train_data, poison.mask, device, cfg.histogram_bins,
                                cfg.histogram_max_pairs, seed=cell.seed)
    t_eval = time.perf_counter() - t2

    epochs = read_jsonl(run_dir / "results.jsonl")
    params = json.loads((run_dir / "params.json").read_text())
    record = {
        "format": CELL_FORMAT, "cell": cell.id, "fingerprint": fingerprint(conf),
        "dataset": ds.label, "split": cfg.split, "attack": cell.attack.label, "stage": cell.stage,
        "method": cell.method,
        "train_data": train_data_label(cell), "defense": cell.defense.defense, "base": cell.base, "seed": cell.seed, "model": cfg.model,
        "config": conf, "train_config": params.get("train"), "strategy_config": params.get("strategy"),
        "train_pairs": len(data), "metrics": metrics, "asr": asr, "epochs": epochs,
        "similarity_histogram": hist,
        "timings": {"data_s": round(t_data, 3), "poison_s": poison.seconds, "train_wall_s": round(t_train, 3),
                    "train_epochs_s": round(sum(float(r.get("seconds", 0)) + float(r.get("hook_seconds", 0))
                                                for r in epochs), 3),
                    "eval_s": round(t_eval, 3), "resumed_from_epoch": resumed_epoch},
        "run_dir": str(run_dir.relative_to(out)), "clipguard_version": clipguard.__version__,
    }
    if detection:
        from clipguard.bench.detect import public

        record["detection"] = public(detection[0])
    write_json(cell.json_path(out), record)
    # a finished cell is never trained further (a rerun with other settings is another cell), so its
    # optimizer state, two thirds of the checkpoint, goes once the result is written
    final = ckpt.resolve_latest(run_dir / "checkpoints")
    if final is not None and epochs_done(ckpt.read_state(final)) >= trainer.cfg.epochs:
        ckpt.drop_optimizer(final)
    return record


def run_scan_cell(cfg: BenchConfig, cell: Cell, out: Path, cache: BenchCache, *, quiet: bool = False
                  ) -> dict[str, Any]:
    """A scan-only cell: every detector of the grid's ``scan`` on the base cell's final model;
    detection metrics only (no training, no ASR)."""
    from clipguard.bench import detect

    out = Path(out)
    conf = cell_config(cfg, cell)
    run_dir = cell.run_dir(out)
    marker = _check_marker(run_dir, conf)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, cell, conf)
    t0 = time.perf_counter()
    data, poison = cache.train_data(cell.dataset, cell.attack, cell.seed)
    t_data = time.perf_counter() - t0
    ref = reference_cell(cfg, cell)
    rec = detect.run_detection(cfg, cell, base_cell(cfg, cell), out, cache,
                               detectors=[(n, cfg.scan.options.get(n)) for n in detect.scan_detectors(cfg.scan, ref is not None)],
                               keep_fraction=None, fingerprint=fingerprint(conf), reference=ref,
                               base_fingerprint=conf["scan"]["base"]["fingerprint"], keep_rows=False, quiet=quiet)
    record = {
        "format": CELL_FORMAT, "cell": cell.id, "fingerprint": fingerprint(conf),
        "dataset": cell.dataset.label, "split": cfg.split, "attack": cell.attack.label, "stage": cell.stage,
        "method": cell.method, "train_data": "poisoned", "defense": "scan", "base": cell.base, "seed": cell.seed,
        "model": cfg.model, "config": conf, "train_pairs": len(data), "detection": detect.public(rec),
        "timings": {"data_s": round(t_data, 3), "poison_s": poison.seconds, "encode_s": rec["encode_s"],
                    "detect_s": rec["detect_s"]},
        "run_dir": str(run_dir.relative_to(out)), "clipguard_version": clipguard.__version__,
    }
    write_json(cell.json_path(out), record)
    return record
