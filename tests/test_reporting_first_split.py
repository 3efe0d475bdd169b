"""The report's view of a pair-selecting defence's first split after the warm-up (issue 16): the
AUROC of its pair score and the poisons it admitted per ASR column, and the clean-vs-poisoned
histogram the run's diagnostics wrote at that epoch, from synthetic cells."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipguard.evaluation.detection import similarity_histogram
from clipguard.io import write_json
from clipguard.reporting.merge import first_split, load_cells, merge_rows, read_results_csv
from clipguard.reporting.plots import first_split_histograms
from clipguard.reporting.report import terminal_tables, write_report
from clipguard.reporting.tables import first_split_table


def _asr(col: str, part: int = 0) -> dict:
    return {"part": part, "column": col, "attack": col, "kind": "backdoor",
            "headline": {"value": 0.5, "metric": "zeroshot backdoor ASR@1", "n": 90},
            "linear_probe": {"value": 0.2}, "metrics": {}}


def _cell(out: Path, attack: str, method: str, seed: int, first: dict | None, cols: list[str],
          png: bool = True) -> dict:
    run_dir = f"runs/fm/{attack}/seed{seed}/pretrain-{method}"
    epochs = [{"epoch": 1, "phase": "unimodal"}, {"epoch": 2, "phase": "clip_low"}]
    if first is not None:
        name = "similarity_hist_epoch03.png"
        epochs.append({"epoch": 3, "phase": "mixed", "first_split": True, "poison_total": 10,
                       "similarity_hist": name, **first})
        epochs.append({"epoch": 4, "phase": "mixed", "poison_total": 10, "similarity_auroc": 0.99,
                       "safe_fraction": 0.9, "safe_poison_recall": 0.0,
                       "similarity_hist": "similarity_hist_epoch04.png"})
        if png:
            scores = torch.linspace(-1, 1, 40)
            poisoned = torch.arange(40) < 10
            similarity_histogram(out / run_dir / name, scores, poisoned, scores > 0, title=f"{method} {seed}")
    return {"cell": f"fm/{attack}/{method}/seed{seed}", "dataset": "fm", "attack": attack, "stage": "pretrain",
            "method": method, "defense": method.lower(), "base": None, "seed": seed, "train_pairs": 100,
            "metrics": {"zeroshot_top1": 0.8}, "asr": [_asr(c, i) for i, c in enumerate(cols)],
            "epochs": epochs, "run_dir": run_dir,
            "timings": {"train_epochs_s": 1.0, "train_wall_s": 1.2, "eval_s": 0.3, "resumed_from_epoch": 0}}


@pytest.fixture()
def bench_dir(tmp_path: Path) -> Path:
    cells = [
        _cell(tmp_path, "close", "CLIP", 0, None, ["close"]),
        _cell(tmp_path, "close", "CLIP", 1, None, ["close"]),
        _cell(tmp_path, "close", "SafeCLIP", 0, {"similarity_auroc": 0.5, "safe_fraction": 0.3,
                                                 "safe_poison_recall": 0.4}, ["close"]),
        _cell(tmp_path, "close", "SafeCLIP", 1, {"similarity_auroc": 0.7, "safe_fraction": 0.3,
                                                 "safe_poison_recall": 0.2, "clip_loss_vs_chance": 0.98}, ["close"]),
        # two attacks in one poisoned set: the per-part counts of the first safe set
        _cell(tmp_path, "mix", "SafeCLIP", 0, {"similarity_auroc": 0.9, "safe_fraction": 0.25,
                                               "safe_poison_recall": 0.1,
                                               "safe_poison_in": {"0-tdpa": "0/4", "1-badnet": "1/6"}},
              ["tdpa", "badnet"], png=False),  # a run folder without its PNG: no figure, the numbers stay
    ]
    for c in cells:
        write_json(tmp_path / "cells" / (c["cell"].replace("/", "__") + ".json"), c)
    write_json(tmp_path / "plan.json", {"cells": [{"method": "CLIP"}, {"method": "SafeCLIP"}]})
    return tmp_path


def test_first_split_is_the_first_epoch_with_pair_scores(bench_dir):
    cells = {c["cell"]: c for c in load_cells(bench_dir)}
    assert first_split(cells["fm/close/SafeCLIP/seed0"])["epoch"] == 3
    assert first_split(cells["fm/close/CLIP/seed0"]) is None


def test_rows_and_table(bench_dir):
    header, rows = merge_rows(load_cells(bench_dir))
    assert {"first_split_poisons.close", "first_split_poisons.tdpa", "first_split_poisons.badnet",
            "first_split_epoch", "first_split_auroc"} <= set(header)
    by = {r["cell"]: r for r in rows}
    assert by["fm/close/SafeCLIP/seed1"]["first_split_poisons.close"] == pytest.approx(0.2)
    assert by["fm/mix/SafeCLIP/seed0"]["first_split_poisons.badnet"] == pytest.approx(1 / 6)
    assert by["fm/mix/SafeCLIP/seed0"]["first_split_poisons.tdpa"] == 0.0
    assert "first_split_poisons.close" not in by["fm/close/CLIP/seed0"]
    # how near chance the model was at the defence's first decision, where the defence recorded it
    assert by["fm/close/SafeCLIP/seed1"]["first_decision_loss_vs_chance"] == pytest.approx(0.98)
    assert by["fm/close/SafeCLIP/seed0"]["first_decision_loss_vs_chance"] is None

    t = first_split_table(rows, ["CLIP", "SafeCLIP"])
    assert t.header == [["Method", "fm (close)", "fm (tdpa)", "fm (badnet)"]]
    assert [r[0] for r in t.rows] == ["SafeCLIP"]  # plain CLIP has no split
    assert t.rows[0][1] == "60.0 ± 14.1 / 30.0 ± 14.1"
    assert t.rows[0][3] == "90.0 (n=1) / 16.7 (n=1)"
    assert "epoch 3" in t.notes[0]
    assert first_split_table([r for r in rows if r["method"] == "CLIP"]) is None


def test_histogram_of_the_lowest_seed_with_its_png(bench_dir):
    cells = load_cells(bench_dir)
    figs = first_split_histograms(bench_dir, cells, ["CLIP", "SafeCLIP"])
    assert list(figs) == ["first_split__fm__close__SafeCLIP"]  # mix has no PNG left; CLIP has no split
    png = bench_dir / "runs/fm/close/seed0/pretrain-SafeCLIP/similarity_hist_epoch03.png"
    assert figs["first_split__fm__close__SafeCLIP"] == png.read_bytes()
    png.unlink()  # seed 0's file gone: seed 1's is used
    figs = first_split_histograms(bench_dir, cells, ["CLIP", "SafeCLIP"])
    assert figs["first_split__fm__close__SafeCLIP"] == (
        bench_dir / "runs/fm/close/seed1/pretrain-SafeCLIP/similarity_hist_epoch03.png").read_bytes()


def test_report_has_the_table_and_the_figure(bench_dir):
    paths = write_report(bench_dir)
    md = paths["markdown"].read_text()
    assert "First split after the warm-up" in md and "| SafeCLIP | 60.0 ± 14.1 / 30.0 ± 14.1 |" in md
    assert "![first_split__fm__close__SafeCLIP](plots/first_split__fm__close__SafeCLIP.png)" in md
    assert (bench_dir / "plots" / "first_split__fm__close__SafeCLIP.png").is_file()
    html = paths["html"].read_text()
    assert 'alt="first_split__fm__close__SafeCLIP"' in html and "The first_split figures" in html
    row = {r["cell"]: r for r in read_results_csv(paths["results"])}["fm/close/SafeCLIP/seed0"]
    assert float(row["first_split_auroc"]) == 0.5 and row["first_split_epoch"] == "3"
    assert "First split after the warm-up" in terminal_tables(bench_dir)
