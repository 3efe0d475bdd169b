"""Reports from synthetic cell JSONs: mean ± std over seeds, table layout, CSV, self-contained HTML."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clipguard.io import write_json
from clipguard.reporting.asr_keys import TARGETED_METRIC
from clipguard.reporting.merge import load_cells, merge_rows, read_results_csv
from clipguard.reporting.report import terminal_tables, write_report
from clipguard.reporting.tables import accuracy_table, asr_table, fmt, mean_std


def _cell(method: str, stage: str, seed: int, zs: float, asr: float, attack: str = "badnet",
          safe: list[tuple[float, float]] | None = None) -> dict:
    epochs = [{"epoch": i + 1, "loss": 1.0} for i in range(3)]
    for r, (frac, kept) in zip(epochs, safe or []):
        r.update(safe_fraction=frac, safe_poison_recall=kept, safe_poison_rate=0.0)
    return {
        "cell": f"fm/{attack}/{method}/seed{seed}", "dataset": "fm", "attack": attack, "stage": stage,
        "method": method, "defense": method.lower(), "base": "CLIP" if stage == "finetune" else None,
        "seed": seed, "train_pairs": 100,
        "metrics": {"zeroshot_top1": zs, "zeroshot_top5": 0.9, "linear_probe_top1": zs + 0.1,
                    "linear_probe_top5": 0.95},
        "asr": [{"column": attack, "attack": attack, "kind": "backdoor",
                 "headline": {"value": asr, "metric": "zeroshot backdoor ASR@1", "n": 90},
                 "linear_probe": {"value": asr / 2}, "metrics": {}}],
        "epochs": epochs,
        "similarity_histogram": {"edges": [-1, 0, 1], "clean": {"n": 95, "counts": [5, 90]},
                                 "poisoned": {"n": 5, "counts": [4, 1]}},
        "timings": {"train_epochs_s": 1.0, "train_wall_s": 1.2, "eval_s": 0.3, "resumed_from_epoch": 0},
    }


@pytest.fixture()
def bench_dir(tmp_path: Path) -> Path:
    cells = [_cell("CLIP", "pretrain", 0, 0.60, 0.90), _cell("CLIP", "pretrain", 1, 0.70, 1.00),
             _cell("SafeCLIP", "pretrain", 0, 0.55, 0.00, safe=[(0.3, 0.2), (0.5, 0.1), (0.6, 0.0)]),
             _cell("SafeCLIP", "pretrain", 1, 0.57, 0.02, safe=[(0.3, 0.4), (0.5, 0.2), (0.6, 0.0)]),
             _cell("CLIP+FT", "finetune", 0, 0.62, 0.50), _cell("CLIP+FT", "finetune", 1, 0.66, 0.70)]
    for c in cells:
        write_json(tmp_path / "cells" / (c["cell"].replace("/", "__") + ".json"), c)
    return tmp_path


def test_mean_std_is_sample_std():
    m, s, n = mean_std([0.9, 1.0])
    assert m == pytest.approx(0.95) and s == pytest.approx(math.sqrt(0.005)) and n == 2
    assert mean_std([0.5])[1] is None
    assert fmt([0.9, 1.0]) == "95.0 ± 7.1"
    assert fmt([0.5], expect_n=2) == "50.0 (n=1)"
    assert fmt([]) == "-"


def test_tables_layout_and_values(bench_dir):
    _, rows = merge_rows(load_cells(bench_dir))
    order = ["CLIP", "SafeCLIP", "CLIP+FT"]
    t1 = asr_table(rows, order)
    assert t1.header[0] == ["Dataset", "fm"] and t1.header[1] == ["Method", "badnet"]
    assert [r[0] for r in t1.rows] == order
    # CLIP: 81 + 90 of 90 + 90 images pooled; SafeCLIP's 0.02 of 90 is no whole count: no interval
    assert t1.rows[0][1] == "95.0 ± 7.1 [90.8–97.3]" and t1.rows[1][1] == "1.0 ± 1.4"
    assert any("Wilson" in n for n in t1.notes)
    t2 = accuracy_table(rows, order)
    assert t2.header[1] == ["Method", "0-shot", "lin-prb", "0-shot", "lin-prb"]
    assert t2.rows[0][1] == "65.0 ± 7.1" and t2.rows[0][2] == "75.0 ± 7.1"
    assert t2.rows[1][3] == "-9.0"  # SafeCLIP 0-shot 56 vs CLIP 65
    assert t2.rows[0][3] == "-"


def test_write_report_csv_md_html(bench_dir):
    paths = write_report(bench_dir)
    rows = read_results_csv(paths["results"])
    assert len(rows) == 6
    by = {r["cell"]: r for r in rows}
    assert float(by["fm/badnet/SafeCLIP/seed1"]["asr.badnet"]) == pytest.approx(0.02)
    assert float(by["fm/badnet/SafeCLIP/seed1"]["final_safe_poison_recall"]) == 0.0
    assert float(by["fm/badnet/SafeCLIP/seed1"]["asr_lp.badnet"]) == pytest.approx(0.01)
    md = paths["markdown"].read_text()
    assert "| CLIP | 95.0 ± 7.1 [90.8–97.3] |" in md
    assert by["fm/badnet/CLIP/seed0"]["asr_hits.badnet"] == "81"  # derived from the rate and n for old cells
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 2  # safe-set curve + similarity histograms
    assert "src=\"plots/" not in html  # self-contained
    assert (bench_dir / "plots" / "safe_set__fm__badnet.png").stat().st_size > 1000
    text = terminal_tables(bench_dir)
    assert "Table 1" in text and "SafeCLIP" in text


def test_corrupt_cell_is_named(bench_dir):
    (bench_dir / "cells" / "bad.json").write_text("{not json")
    with pytest.raises(Exception, match="bad.json"):
        load_cells(bench_dir)


def test_method_order_from_plan(bench_dir):
    write_json(bench_dir / "plan.json", {"cells": [{"method": m} for m in ("CLIP+FT", "SafeCLIP", "CLIP")]})
    text = terminal_tables(bench_dir)
    t1 = text.split("Table 2")[0]
    assert t1.index("CLIP+FT") < t1.index("SafeCLIP") < t1.index("\nCLIP ")
    json.loads((bench_dir / "plan.json").read_text())


def test_tdpa_cells_state_targets_taken_out_of_targets_tried():
    from clipguard.reporting.tables import _target_count

    rows = [{"asr.tdpa": 0.25, "asr_n.tdpa": 8, "asr_metric.tdpa": "zeroshot TDPA success (top-1 = adversarial class)"},
            {"asr.tdpa": 0.0, "asr_n.tdpa": 8, "asr_metric.tdpa": "zeroshot TDPA success (top-1 = adversarial class)"}]
    assert _target_count(rows, "tdpa") == " (2/16)"
    backdoor = [{"asr.badnet": 0.5, "asr_n.badnet": 900, "asr_metric.badnet": "zeroshot backdoor ASR@1"}]
    assert _target_count(backdoor, "badnet") == ""


def test_asr_intervals_travel_from_the_cells_to_the_csv_and_tables(tmp_path):
    """Cells that record successes and the Wilson interval: CSV columns per cell, and Table 1 shows
    the interval of the rate pooled over the seeds (here 54/90 + 63/90 = 117/180)."""
    from clipguard.evaluation.intervals import wilson_ci95, wilson_interval
    from clipguard.reporting.tables import pooled_ci, to_html, to_markdown

    cells = []
    for seed, k in ((0, 54), (1, 63)):
        c = _cell("CLIP", "pretrain", seed, 0.6, k / 90)
        c["asr"][0]["headline"].update(hits=k, ci95=wilson_ci95(k, 90))
        c["asr"][0]["linear_probe"] = {"value": round(k / 2 / 90, 6), "n": 90, "hits": k // 2,
                                       "ci95": wilson_ci95(k // 2, 90)}
        c["metrics"]["linear_probe_C"] = 10.0
        cells.append(c)
    header, rows = merge_rows(cells)
    for col in ("asr_hits.badnet", "asr_ci95_lo.badnet", "asr_ci95_hi.badnet", "asr_lp_hits.badnet",
                "asr_lp_ci95_lo.badnet", "asr_lp_ci95_hi.badnet", "linear_probe_C"):
        assert col in header
    assert rows[0]["asr_hits.badnet"] == 54 and rows[1]["asr_lp_hits.badnet"] == 31
    assert [rows[0]["asr_ci95_lo.badnet"], rows[0]["asr_ci95_hi.badnet"]] == wilson_ci95(54, 90)
    assert rows[0]["linear_probe_C"] == 10.0
    lo, hi = wilson_interval(117, 180)
    assert pooled_ci(rows, "asr", "badnet") == (117, 180, lo, hi)
    t1 = asr_table(rows)
    assert t1.rows[0][1] == f"65.0 ± 7.1 [{lo * 100:.1f}–{hi * 100:.1f}]" == "65.0 ± 7.1 [57.8–71.6]"
    assert "[57.8–71.6]" in to_markdown(t1) and "[57.8–71.6]" in to_html(t1)
    assert "Wilson" in to_markdown(t1) and "pooled over the seeds" in to_html(t1)
    lp = asr_table(rows, key="asr_lp")
    lo, hi = wilson_interval(58, 180)
    assert lp.rows[0][1].endswith(f"[{lo * 100:.1f}–{hi * 100:.1f}]")
    base = asr_table(rows, key="asr_base")  # the base rate is shown without an interval
    assert not any("Wilson" in n for n in base.notes)
    # a seed without a count leaves the cell without an interval (no partial pooling)
    del rows[1]["asr_hits.badnet"]
    assert pooled_ci(rows, "asr", "badnet") is None and "[" not in asr_table(rows).rows[0][1]


def _row(method: str, seed: int, asr: dict[str, float], *, defense: str = "none", train_data: str = "poisoned",
         detect: str | None = None) -> dict:
    r = {"dataset": "fm", "method": method, "defense": defense, "base": None, "seed": seed,
         "train_data": train_data, "detect_detector": detect}
    for col, v in asr.items():
        r[f"asr.{col}"] = v
        r[f"asr_metric.{col}"] = (f"zeroshot {TARGETED_METRIC}" if col.startswith("tdpa")
                                  else "zeroshot backdoor ASR@1")
    return r


def test_verdict_reads_each_defence_against_the_base_rate_and_the_undefended_model():
    """holds within the tolerance of the clean model's rate (2 points for a backdoor, one target in
    eight for targeted poisoning), breaks beyond it, and a column the undefended model itself does
    not exceed is an attack that did not take."""
    from clipguard.reporting.verdict import verdict_table

    rows = []
    for s in (0, 1):
        rows += [_row("CLIP", s, {"badnet": 0.01, "tdpa": 0.0, "weak": 0.01}, train_data="clean"),
                 _row("CLIP", s, {"badnet": 0.95, "tdpa": 0.75, "weak": 0.02}),
                 _row("Safe", s, {"badnet": 0.025, "tdpa": 0.25, "weak": 0.01}, defense="safeclip"),
                 _row("DAO", s, {"badnet": 0.20, "tdpa": 0.10, "weak": 0.01}, detect="dao")]
    t = verdict_table(rows, ["CLIP", "DAO", "Safe"])
    assert t is not None and t.header[1] == ["Method", "badnet", "tdpa", "weak"]
    body = {line[0]: line[1:] for line in t.rows}
    assert list(body) == ["DAO", "Safe"]  # the undefended model is the reference, not a row
    assert body["Safe"][0].startswith("holds: 2.5 (undefended 95.0, base 1.0)")
    assert body["Safe"][1].startswith("breaks: 25.0")
    assert body["DAO"][0].startswith("breaks: 20.0") and body["DAO"][1].startswith("holds: 10.0")
    assert all(cell.startswith("did not take") for cell in (body["Safe"][2], body["DAO"][2]))
    # without a clean-data row the untriggered rate of the undefended model is the base
    poisoned = [r for r in rows if r["train_data"] == "poisoned"]
    for r in poisoned:
        r["asr_base.badnet"] = 0.01
    t2 = verdict_table(poisoned)
    assert dict((line[0], line[1]) for line in t2.rows)["Safe"].startswith("holds")
    assert all(line[2] == "-" for line in t2.rows)  # no base rate for tdpa: no verdict
    assert verdict_table([r for r in rows if r["method"] == "CLIP"]) is None
    # a defence trained on clean data is its own base rate: it may confuse the targets by itself
    own = rows + [_row("Safe", s, {"badnet": 0.01, "tdpa": 0.25, "weak": 0.02}, defense="safeclip",
                       train_data="clean") for s in (0, 1)]
    body = {line[0]: line[1:] for line in verdict_table(own).rows}
    assert body["Safe"][1].startswith("holds: 25.0 (undefended 75.0, base 25.0)")
    assert body["DAO"][1].startswith("holds: 10.0 (undefended 75.0, base 0.0)")
    # whether the attack took is read against the undefended model's own base, not the method's
    assert body["Safe"][2] == "did not take (undefended 2.0, base 1.0)"


def test_a_target_that_changes_with_the_seed_is_named_per_seed_under_table_1():
    """A grid's `target: [..]` list attacks each seed towards its own class: the CSV keeps each
    cell's target and Table 1 says which seed went where; a fixed target adds no note."""
    cells = []
    for seed, name in ((4, "pullover"), (5, "ankle boot"), (10, "t-shirt")):
        c = _cell("CLIP", "pretrain", seed, 0.6, 0.5)
        c["asr"][0]["target"] = {"index": 0, "name": name}
        cells.append(c)
    header, rows = merge_rows(cells)
    assert "asr_target.badnet" in header and rows[1]["asr_target.badnet"] == "ankle boot"
    notes = asr_table(rows).notes
    assert "Target of `badnet` per seed: seed 4 pullover, seed 5 ankle boot, seed 10 t-shirt." in notes
    for c in cells:
        c["asr"][0]["target"] = {"index": 0, "name": "bag"}
    assert not any(n.startswith("Target of") for n in asr_table(merge_rows(cells)[1]).notes)
