"""The files of a scan folder, each written atomically; ``scan.json`` last, as the marker of a
finished scan.

  scores.csv       every pair: row, image, caption, each detector's score and rank (1 = most
                   suspicious), whether the keep rule kept it (and, with a manifest, the truth)
  kept.csv         the kept pairs in the input's columns and separator; their images hard-linked
                   (copied across file systems) into kept_images/, so the folder trains as is
  kept/            webdataset input: the kept pairs as shards instead of kept.csv
  suspicious.csv   the top-N pairs by the keep detector's score
  plots/           with a manifest: score_hist.png and roc.png
  classes.json     copied from beside the input CSV, for class-name labels
  scan.json        settings, timings, keep rules and metrics
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from clipguard.errors import ConfigError, OutputError
from clipguard.io import atomic_dir, atomic_path, check_output_path, write_json

SCAN_FILE = "scan.json"
KEPT_IMAGES = "kept_images"
OUTPUT_FILES = ("scores.csv", "kept.csv", "suspicious.csv", SCAN_FILE)
PLOTS = ("plots/score_hist.png", "plots/roc.png")


def check_out(out: str | Path, overwrite: bool, data_csv: str | Path | None) -> Path:
    """The scan folder, refused before any work when it holds a finished scan (unless
    ``overwrite``), cannot be a folder, or an output would replace the input CSV."""
    out = check_output_path(out, folder=True)
    if (out / SCAN_FILE).exists() and not overwrite:
        raise ConfigError(f"{out / SCAN_FILE} exists: {out} holds a scan; pass --overwrite to replace it "
                          f"or choose another --out")
    if data_csv is not None:
        src = Path(data_csv).resolve()
        for name in OUTPUT_FILES:
            if (out / name).resolve() == src:
                raise ConfigError(f"--out {out} would overwrite the input {data_csv} with {name}; "
                                  f"choose another --out")
    return out


def row_ids(data, kind: str) -> list[int]:
    """0-based data row of each pair in the input CSV (its manifest's numbering), or the pair's
    position for shards."""
    if kind == "csv" and data.rows:
        return [line - 2 for line in data.rows]
    return list(range(len(data)))


def _open_csv(tmp: Path):
    f = open(tmp, "w", newline="", encoding="utf-8")
    return f, csv.writer(f, lineterminator="\n")


def _fmt(x: float) -> str:
    return f"{x:.8g}"


def write_scores(path: Path, data, result, ids: list[int]) -> None:
    runs = result.runs
    ranks = [r.ranks() for r in runs]
    header = ["row", "image", "caption"]
    if result.poisoned is not None:
        header += ["poisoned"] + (["part"] if result.parts else [])
    for r in runs:
        header += [f"{r.name}_score", f"{r.name}_rank"]
    header.append("kept")
    part_of = _part_names(result, len(data))
    kept = result.keep.mask
    with atomic_path(path) as tmp:
        f, w = _open_csv(tmp)
        with f:
            w.writerow(header)
            for i in range(len(data)):
                row: list[Any] = [ids[i], data.paths[i], data.captions[i]]
                if result.poisoned is not None:
                    row.append(int(result.poisoned[i]))
                    if result.parts:
                        row.append(part_of[i])
                for r, rk in zip(runs, ranks):
                    row += [_fmt(r.scores[i]), int(rk[i])]
                row.append(int(kept[i]))
                w.writerow(row)


def _part_names(result, n: int) -> list[str]:
    names = [""] * n
    for name, mask in (result.parts or {}).items():
        for i in np.flatnonzero(mask):
            names[i] = name
    return names


def write_suspicious(path: Path, data, result, ids: list[int], top: int) -> None:
    run = result.run(result.keep_detector)
    order = np.argsort(-run.scores, kind="stable")[:top]
    header = ["rank", "row", "image", "caption", f"{run.name}_score"]
    if result.poisoned is not None:
        header += ["poisoned"] + (["part"] if result.parts else [])
    header.append("kept")
    part_of = _part_names(result, len(data))
    with atomic_path(path) as tmp:
        f, w = _open_csv(tmp)
        with f:
            w.writerow(header)
            for rank, i in enumerate(order, 1):
                row: list[Any] = [rank, ids[i], data.paths[i], data.captions[i], _fmt(run.scores[i])]
                if result.poisoned is not None:
                    row.append(int(result.poisoned[i]))
                    if result.parts:
                        row.append(part_of[i])
                row.append(int(result.keep.mask[i]))
                w.writerow(row)


def write_kept_csv(out: Path, data, keep: np.ndarray, spec) -> dict[str, str]:
    """kept.csv with the input's header, separator and rows; image paths point into
    kept_images/ (hard links) unless the scan folder is the input's own folder."""
    from clipguard.attacks.writer import link_or_copy, local_name
    from clipguard.data.csv_dataset import read_rows, resolve_image_path, write_csv

    src = Path(data.source)
    header, rows = read_rows(src, spec)
    root = src.parent
    same_folder = out.resolve() == root.resolve()
    kept_ids = np.flatnonzero(keep).tolist()
    out_rows = []
    files = {"kept": "kept.csv"}
    if same_folder:
        out_rows = [dict(rows[data.rows[i] - 2]) for i in kept_ids]
    else:
        with atomic_dir(out / KEPT_IMAGES) as tmp:
            for i in kept_ids:
                raw = dict(rows[data.rows[i] - 2])
                rel = raw[spec.img_key].strip()
                line = data.rows[i]
                img = resolve_image_path(root, rel, allow_outside_root=spec.allow_outside_root,
                                         csv_path=str(src), line=line, field=spec.img_key)
                new = local_name(KEPT_IMAGES, line - 2, rel)
                link_or_copy(img, tmp / Path(new).name)
                raw[spec.img_key] = new
                out_rows.append(raw)
        files["kept_images"] = KEPT_IMAGES + "/"
        classes = root / "classes.json"
        if classes.is_file():
            with atomic_path(out / "classes.json") as t:
                shutil.copyfile(classes, t)
            files["classes"] = "classes.json"
    write_csv(out / "kept.csv", out_rows, header, spec.separator)
    return files


def write_kept_shards(out: Path, data, keep: np.ndarray) -> dict[str, str]:
    """Shard input: the kept pairs as webdataset shards in kept/ (images at the model's size)."""
    from clipguard.data.webdataset import write_shards

    with atomic_dir(out / "kept") as tmp:
        write_shards(data, tmp, ids=np.flatnonzero(keep).tolist())
    return {"kept": "kept/"}


def write_plots(out: Path, result) -> dict[str, str]:
    from clipguard.detection import plots

    y = result.poisoned
    if y is None or not y.any() or y.all():
        return {}
    names = [r.name for r in result.runs]
    scores = [r.scores for r in result.runs]
    aurocs = [(r.metrics or {}).get("auroc") for r in result.runs]
    files = {}
    for key, rel, fig in (("score_histograms", PLOTS[0], plots.score_histograms),
                          ("roc", PLOTS[1], plots.roc_plot)):
        png = fig(names, scores, y, aurocs)
        with atomic_path(out / rel) as tmp:
            tmp.write_bytes(png)
        files[key] = rel
    return files


def write_all(out: str | Path, data, result, *, kind: str, spec, top: int) -> dict[str, str]:
    """Every output but scan.json; returns {what: relative path}. A previous scan's marker and
    plots are removed first, so a crash never leaves a scan.json that describes other files."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for rel in (SCAN_FILE, *PLOTS):
            if (out / rel).is_file():
                (out / rel).unlink()
    except OSError as e:
        raise OutputError(e.strerror or str(e), path=str(out)) from e
    ids = row_ids(data, kind)
    write_scores(out / "scores.csv", data, result, ids)
    files = {"scores": "scores.csv"}
    if kind == "csv":
        files.update(write_kept_csv(out, data, result.keep.mask, spec))
    else:
        files.update(write_kept_shards(out, data, result.keep.mask))
    write_suspicious(out / "suspicious.csv", data, result, ids, top)
    files["suspicious"] = "suspicious.csv"
    files.update(write_plots(out, result))
    return files


def write_summary(out: str | Path, summary: dict[str, Any]) -> None:
    write_json(Path(out) / SCAN_FILE, summary)
