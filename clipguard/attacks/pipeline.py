"""``poison_csv``: validate everything, plan the poisons, then write the folder atomically.

Nothing is written until the attack is set up (patterns, optimised patches) and the plan is
complete, and the folder appears only when every file is in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import clipguard
from clipguard.attacks.base import Attack, EvalSet, PoisonContext, PoisonPlan
from clipguard.attacks.writer import copy_clean, save_png, write_rows
from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import CsvSpec, ImageCaptionData, load_csv, read_rows, require_labels
from clipguard.errors import ConfigError, DataError
from clipguard.io import atomic_dir, sha256_file, write_json

MODES = ("inject", "replace")


def resolve_count(rate: float | None, count: int | None, n: int) -> int:
    if (rate is None) == (count is None):
        raise ConfigError("give exactly one of --rate (fraction of the training rows) or --count")
    if rate is not None:
        rate = float(rate)
        if not 0.0 < rate <= 1.0:
            raise ConfigError(f"--rate must be in (0, 1], got {rate}")
        c = round(rate * n)
        if c < 1:
            raise ConfigError(f"--rate {rate} of {n} training rows yields no poisoned pair "
                              f"(need at least {1 / n:.2g})")
        return c
    if int(count) < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    return int(count)


def resolve_target(target: str | int, classes: ClassInfo | None, data: ImageCaptionData,
                   classes_path: Path | None) -> int:
    if classes is not None:
        try:
            return classes.index(target)
        except DataError as e:
            raise DataError(str(e), file=str(classes_path), field="classes") from None
    if isinstance(target, int) or str(target).strip().isdigit():
        t = int(target)
        known = sorted(set(int(x) for x in data.labels.tolist() if x >= 0))
        if known and t not in known:
            raise DataError(f"target class {t} never occurs in the labels {known}", file=data.source,
                            field="label")
        return t
    raise ConfigError(f"target class {target!r} given by name but there is no classes.json "
                      "(pass --classes)")


def _check_out(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Replace only an earlier poisoned folder (it holds manifest.json), and that only when asked:
    the folder is swapped whole, so anything else in it would be lost."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    top = out.resolve()
    for p in inputs:
        if p.resolve().is_relative_to(top):
            raise ConfigError(f"--out {out} holds the input {p}; choose another folder")
    if not any(out.iterdir()):
        return
    if not (out / "manifest.json").is_file():
        raise ConfigError(f"{out} exists and is not a poisoned-dataset folder (no manifest.json); "
                          "choose another --out")
    if not overwrite:
        raise ConfigError(f"{out} holds an earlier poisoned dataset; pass --overwrite to replace it, "
                          "or choose another --out")


def poison_csv(data_csv: str | Path, attack: str | Attack, *, target: str | int,
               rate: float | None = None, count: int | None = None, seed: int = 0,
               out: str | Path, eval_csv: str | Path | None = None,
               options: dict[str, Any] | None = None, spec: CsvSpec | None = None,
               mode: str = "inject", classes: str | Path | None = None,
               trigger_seed: int | None = None, overwrite: bool = False,
               skip_bad_rows: bool = False) -> dict[str, Any]:
    """Poison ``data_csv`` into the folder ``out`` (see writer.py for its layout).

    With ``skip_bad_rows`` bad source rows are left out of DIR/train.csv (counted in the manifest's
    ``source_rows_skipped``), so every row index in the manifest is a row of DIR/train.csv.
    """
    from clipguard.attacks import build

    spec = spec or CsvSpec()
    data_csv, out = Path(data_csv), Path(out)
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {MODES}, not {mode!r}")
    atk = build(attack, options) if isinstance(attack, str) else attack
    if options and not isinstance(attack, str):
        raise ConfigError("pass options only with an attack name")
    classes_path = Path(classes) if classes else data_csv.parent / "classes.json"
    inputs = [data_csv, classes_path] + ([Path(eval_csv)] if eval_csv is not None else [])
    _check_out(out, overwrite, inputs)
    if classes and not classes_path.is_file():
        raise DataError("file not found", file=str(classes_path))
    cinfo = ClassInfo.load(classes_path) if classes_path.is_file() else None
    header, rows = read_rows(data_csv, spec)
    data = load_csv(data_csv, spec, skip_bad_rows=skip_bad_rows, classes=cinfo)
    rows = _loaded_rows(rows, data)
    tgt = resolve_target(target, cinfo, data, classes_path if cinfo else None)
    n = resolve_count(rate, count, len(data))
    ev = ev_header = ev_rows = None
    if eval_csv is not None:
        eval_csv = Path(eval_csv)
        ev_header, ev_rows = read_rows(eval_csv, spec)
        _, h, w = data.images.shape[1:]
        ev = load_csv(eval_csv, spec, image_size=h if h == w else None, skip_bad_rows=skip_bad_rows,
                      classes=cinfo)
        ev_rows = _loaded_rows(ev_rows, ev)
        if tuple(ev.images.shape[1:]) != tuple(data.images.shape[1:]):
            raise DataError(f"held-out images are {tuple(ev.images.shape[2:])}, training images "
                            f"{tuple(data.images.shape[2:])}", file=str(eval_csv), field=spec.img_key)
        require_labels(ev, "the ASR evaluation")
    elif atk.needs_eval_data:
        raise ConfigError(f"attack '{atk.name}' needs the held-out split: pass --eval-data")
    ctx = PoisonContext(data=data, target=tgt, seed=int(seed),
                        trigger_seed=int(seed if trigger_seed is None else trigger_seed),
                        classes=cinfo, eval_data=ev)
    atk.setup(ctx)
    plan = atk.plan(ctx, n)
    eset = atk.eval_set(ctx) if ev is not None else None
    manifest = _manifest(atk, ctx, plan, eset, mode=mode, n=n, rate=rate, data_csv=data_csv,
                         eval_csv=eval_csv, spec=spec, cinfo=cinfo, data=data)
    with atomic_dir(out) as tmp:
        _write(tmp, data_csv, header, rows, spec, plan, mode, manifest)
        if eset is not None:
            _write_eval(tmp, eval_csv, ev_header, ev_rows, spec, eset, manifest, _csv_rows(ev))
        if cinfo is not None:
            cinfo.save(tmp / "classes.json")
        write_json(tmp / "manifest.json", manifest)
    manifest["_dir"] = str(out)
    return manifest


def _loaded_rows(rows: list[dict[str, str]], data: ImageCaptionData) -> list[dict[str, str]]:
    """The raw rows that loaded, in data order (``data.rows`` are CSV lines; data starts at 2)."""
    return [rows[line - 2] for line in data.rows] if data.skipped else rows


def _csv_rows(data: ImageCaptionData) -> list[int]:
    """0-based data row in the source CSV of each loaded pair (differs from i after skips)."""
    return [line - 2 for line in data.rows] if data.rows else list(range(len(data)))


def _manifest(atk: Attack, ctx: PoisonContext, plan: PoisonPlan, eset: EvalSet | None, *, mode: str,
              n: int, rate: float | None, data_csv: Path, eval_csv: Path | None, spec: CsvSpec,
              cinfo: ClassInfo | None, data: ImageCaptionData) -> dict[str, Any]:
    n_rows = len(data)
    src_rows = _csv_rows(data)
    if mode == "inject":
        poisoned = list(range(n_rows, n_rows + n))
    else:
        assert plan.replace_rows is not None
        if len(set(plan.replace_rows)) != len(plan.replace_rows):
            raise ConfigError(f"attack '{atk.name}' planned to replace the same row twice")
        poisoned = list(plan.replace_rows)
    params = atk.params()
    per_trigger = params.get("target_per_trigger")
    targets = sorted(set(per_trigger.values())) if per_trigger else [ctx.target]
    m: dict[str, Any] = {
        "attack": atk.name,
        "kind": atk.kind,
        "params": params,
        "seed": ctx.seed,
        "trigger_seed": ctx.trigger_seed,
        "target": {"index": ctx.target, "name": ctx.class_name(ctx.target)},
        "targets": [{"index": t, "name": ctx.class_name(t)} for t in targets],
        "target_captions": list(dict.fromkeys(plan.captions)),
        "mode": mode,
        "count": n,
        "rate": float(rate) if rate is not None else None,
        "n_source_rows": n_rows,
        "n_rows": n_rows + n if mode == "inject" else n_rows,
        "poison_fraction": round(n / (n_rows + n if mode == "inject" else n_rows), 6),
        "poisoned_rows": poisoned,
        "poison_sources": [src_rows[s] if s >= 0 else s for s in plan.sources],
        "poison_triggers": plan.triggers,
        "source_csv": str(data_csv.resolve()),
        "source_sha256": sha256_file(data_csv),
        "source_rows_skipped": data.skipped,
        "csv": {"img_key": spec.img_key, "caption_key": spec.caption_key,
                "label_key": spec.label_key, "separator": spec.separator,
                "allow_outside_root": spec.allow_outside_root},
        "image_shape": list(ctx.image_shape),
        "classes": "classes.json" if cinfo is not None else None,
        "clipguard_version": clipguard.__version__,
        "info": plan.info,
    }
    if eset is not None:
        assert eval_csv is not None
        m["eval"] = {
            "csv": "asr_eval.csv",
            "kind": eset.kind,
            "n_images": len(eset.sources),
            "excluded_class": {"index": eset.excluded_classes[0],
                               "name": ctx.class_name(eset.excluded_classes[0])},
            "excluded_classes": [{"index": c, "name": ctx.class_name(c)} for c in eset.excluded_classes],
            "triggers": sorted(set(eset.triggers)),
            "source_csv": str(eval_csv.resolve()),
            "source_sha256": sha256_file(eval_csv),
            "source_rows_skipped": ctx.eval_data.skipped if ctx.eval_data is not None else 0,
        }
        if eset.targeted:
            ev_rows = _csv_rows(ctx.eval_data) if ctx.eval_data is not None else []
            m["eval"]["clean_csv"] = "clean_eval.csv"
            m["eval"]["target_eval_rows"] = [ev_rows[s] for s in eset.sources]
    return m


def _write(tmp: Path, data_csv: Path, header: list[str], rows: list[dict[str, str]], spec: CsvSpec,
           plan: PoisonPlan, mode: str, manifest: dict[str, Any]) -> None:
    root = data_csv.parent
    replaced = dict(zip(plan.replace_rows or [], range(len(plan.captions)))) if mode == "replace" else {}
    label_key = spec.label_key if spec.label_key in header else None
    out_rows: list[dict[str, str]] = []
    for i, row in enumerate(rows):
        j = replaced.get(i)
        if j is None:
            r = dict(row)
            r[spec.img_key] = copy_clean(root, row[spec.img_key].strip(), tmp, "images", i,
                                         allow_outside_root=spec.allow_outside_root)
        else:
            r = _poison_row(tmp, row, plan, j, spec, label_key)
        out_rows.append(r)
    if mode == "inject":
        for j in range(len(plan.captions)):
            src = plan.sources[j]
            template = rows[src] if src >= 0 else {k: "" for k in header}
            out_rows.append(_poison_row(tmp, template, plan, j, spec, label_key))
    write_rows(tmp / "train.csv", out_rows, header, spec.separator)


def _poison_row(tmp: Path, template: dict[str, str], plan: PoisonPlan, j: int, spec: CsvSpec,
                label_key: str | None) -> dict[str, str]:
    rel = f"poison/{j:06d}.png"
    save_png(tmp / rel, plan.images[j])
    r = dict(template)
    r[spec.img_key] = rel
    r[spec.caption_key] = plan.captions[j]
    if label_key is not None:
        r[label_key] = str(plan.labels[j]) if plan.labels[j] >= 0 else ""
    return r


def _write_eval(tmp: Path, eval_csv: Path, header: list[str], rows: list[dict[str, str]],
                spec: CsvSpec, eset: EvalSet, manifest: dict[str, Any], csv_rows: list[int]) -> None:
    root = eval_csv.parent
    label_key = spec.label_key or "label"
    clean: dict[int, str] = {}
    out = []

    def copy(i: int) -> str:
        return copy_clean(root, rows[i][spec.img_key].strip(), tmp, "eval_clean", csv_rows[i],
                          allow_outside_root=spec.allow_outside_root)

    for j, src in enumerate(eset.sources):
        if src not in clean:
            clean[src] = copy(src)
        rel = f"asr_eval/{j:06d}.png"
        save_png(tmp / rel, eset.images[j])
        out.append({spec.img_key: rel, spec.caption_key: rows[src][spec.caption_key],
                    label_key: str(eset.labels[j]), "target": str(eset.targets[j]),
                    "trigger": eset.triggers[j], "clean_filepath": clean[src],
                    "eval_row": str(csv_rows[src])})
    cols = [spec.img_key, spec.caption_key, label_key, "target", "trigger", "clean_filepath", "eval_row"]
    write_rows(tmp / "asr_eval.csv", out, cols, spec.separator)
    if eset.targeted:
        drop = set(eset.sources)
        keep = []
        for i, row in enumerate(rows):
            if i in drop:
                continue
            r = dict(row)
            r[spec.img_key] = clean.get(i) or copy(i)
            keep.append(r)
        write_rows(tmp / "clean_eval.csv", keep, header, spec.separator)
