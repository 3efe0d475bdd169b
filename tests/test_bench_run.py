"""End to end: a 2x2 grid on tiny data, killed midway and finished by a re-run; an interrupted
cell resumes from its checkpoint; the merged table equals the per-cell JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clipguard.bench.cache import BenchCache
from clipguard.bench.cell import prepare_trainer
from clipguard.bench.config import load_config
from clipguard.bench.plan import plan_cells
from clipguard.bench.runner import run_bench
from clipguard.io import read_jsonl
from clipguard.reporting.merge import load_cells, read_results_csv

pytestmark = pytest.mark.slow


def _grid(fm_dir: Path, tmp_path: Path, epochs: int = 1) -> Path:
    grid = {
        "name": "tiny",
        "seeds": [0],
        "datasets": {"fm": {"train": str(fm_dir / "train.csv"), "test": str(fm_dir / "test.csv"),
                            "probe_size": 100, "finetune_size": 128}},
        "attacks": {"badnet": {"attack": "badnet", "target": "bag", "rate": 0.05},
                    "tdpa": {"attack": "tdpa", "target": "bag", "count": 8, "options": {"targets": 2}}},
        "pretrain": {"train": {"epochs": epochs, "batch_size": 64, "warmup": 2}, "defenses": {"CLIP": "none"}},
        "finetune": {"train": {"epochs": 1, "batch_size": 64, "lr": 1e-4, "warmup": 1},
                     "defenses": {"FT": "ft"}},
    }
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(grid))
    return p


def _check_merged_equals_cells(out: Path) -> None:
    cells = {c["cell"]: c for c in load_cells(out)}
    rows = read_results_csv(out / "results.csv")
    assert sorted(r["cell"] for r in rows) == sorted(cells)
    for r in rows:
        c = cells[r["cell"]]
        assert float(r["zeroshot_top1"]) == pytest.approx(c["metrics"]["zeroshot_top1"])
        assert float(r["linear_probe_top1"]) == pytest.approx(c["metrics"]["linear_probe_top1"])
        assert r["method"] == c["method"] and int(r["seed"]) == c["seed"]
        for part in c["asr"]:
            assert float(r[f"asr.{part['column']}"]) == pytest.approx(part["metrics"]["zeroshot"]["asr@1"])
            assert int(r[f"asr_n.{part['column']}"]) == part["metrics"]["zeroshot"]["protocol"]["n_images"]
        other = {k for k in r if k.startswith("asr.") and r[k] != ""}
        assert other == {f"asr.{p['column']}" for p in c["asr"]}


def test_grid_killed_midway_then_finished(fm_dir, tmp_path):
    config = _grid(fm_dir, tmp_path)
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clipguard.cli", "bench", str(config), "--out", str(out),
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    first: Path | None = None
    while time.time() < deadline and proc.poll() is None:
        done = sorted((out / "cells").glob("*.json")) if (out / "cells").is_dir() else []
        if done:
            first = done[0]
            break
        time.sleep(0.05)
    assert first is not None, f"no cell finished: {proc.stderr.read().decode() if proc.poll() is not None else ''}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.read_text() for p in (out / "cells").glob("*.json")}
    assert 1 <= len(finished) < 4, "the kill must land midway for this test to mean anything"

    cfg = load_config(config)
    meta = run_bench(cfg, out, quiet=True, jobs=2)  # the rest in 2 worker processes
    assert meta["cells_skipped"] == len(finished)
    assert meta["cells_run"] == 4 - len(finished)
    for name, text in finished.items():  # finished cells are not redone
        assert (out / "cells" / name).read_text() == text
    assert len(list((out / "cells").glob("*.json"))) == 4

    _check_merged_equals_cells(out)
    md = (out / "report.md").read_text()
    assert "Table 1" in md and "Table 2" in md and "CLIP+FT" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    # poisoned data was made once per (dataset, attack, seed) and fine-tuning started from the shared model
    assert len(list((out / "poison").glob("fm/*/seed0/part0-*/manifest.json"))) == 2
    ft = json.loads(next((out / "cells").glob("fm__badnet__CLIP+FT__seed0.json")).read_text())
    assert "runs/fm/badnet/seed0/pretrain-CLIP" in ft["train_config"]["checkpoint"]
    # a third run does nothing
    meta = run_bench(cfg, out, quiet=True, report=False)
    assert meta["cells_run"] == 0 and meta["cells_skipped"] == 4


def test_interrupted_cell_resumes_from_checkpoint(fm_dir, tmp_path):
    config = _grid(fm_dir, tmp_path, epochs=2)
    cfg = load_config(config, ["attacks.tdpa=none", "finetune=null"])
    out = tmp_path / "bench"
    cell = next(c for c in plan_cells(cfg) if c.attack.label == "badnet")
    trainer, _, _ = prepare_trainer(cfg, cell, out, BenchCache(cfg, out), quiet=True)
    trainer.cfg.stop_after = 1  # the "crash": one of two epochs done, checkpoint written
    trainer.fit(resume="latest")
    first = read_jsonl(cell.run_dir(out) / "results.jsonl")
    assert [r["epoch"] for r in first] == [1]

    run_bench(cfg, out, quiet=True, only=cell.id)
    rec = json.loads(cell.json_path(out).read_text())
    assert rec["timings"]["resumed_from_epoch"] == 1
    hist = read_jsonl(cell.run_dir(out) / "results.jsonl")
    assert [r["epoch"] for r in hist] == [1, 2]
    assert hist[0] == first[0]  # epoch 1 was not retrained
    assert "safe_fraction" not in hist[0]  # plain CLIP selects nothing


def test_epoch_zeroshot_records_every_epoch_without_changing_the_cell(fm_dir, tmp_path):
    """``epoch_zeroshot: true`` adds the evaluation rows' zero-shot to each epoch of results.jsonl;
    the last epoch's figure is the cell's, and the cell's fingerprint (what it trains) is unchanged."""
    from clipguard.bench.cell import cell_config

    config = _grid(fm_dir, tmp_path, epochs=2)
    plain = load_config(config, ["attacks.tdpa=none", "finetune=null"])
    cfg = load_config(config, ["attacks.tdpa=none", "finetune=null", "epoch_zeroshot=true"])
    assert cfg.epoch_zeroshot and not plain.epoch_zeroshot
    cell = next(c for c in plan_cells(cfg) if c.attack.label == "badnet")
    assert cell_config(cfg, cell) == cell_config(plain, cell)
    out = tmp_path / "bench"
    run_bench(cfg, out, quiet=True, only=cell.id)
    hist = read_jsonl(cell.run_dir(out) / "results.jsonl")
    assert [r["epoch"] for r in hist] == [1, 2]
    assert all(0.0 <= r["zeroshot_top1"] <= 100.0 for r in hist)
    rec = json.loads(cell.json_path(out).read_text())
    assert hist[-1]["zeroshot_top1"] == pytest.approx(rec["metrics"]["zeroshot_top1"], abs=1e-3)


def test_clean_cell_measures_the_base_rate_of_every_attack(fm_dir, tmp_path):
    """A model trained on clean data is measured with the poisoned attacks' trigger sets: Table 1
    shows it as its own '(clean data)' row, the floor an ASR is read against."""
    from clipguard.reporting.report import terminal_tables

    config = _grid(fm_dir, tmp_path)
    cfg = load_config(config, ["attacks.tdpa=none"])
    assert not any(c.stage == "finetune" and c.attack.clean for c in plan_cells(cfg))
    out = tmp_path / "bench"
    run_bench(cfg, out, quiet=True, only="fm/tdpa/CLIP/")
    rec = json.loads((out / "cells" / "fm__tdpa__CLIP__seed0.json").read_text())
    assert rec["train_data"] == "clean"
    assert [(p["column"], p["reference"]) for p in rec["asr"]] == [("badnet", True)]
    assert rec["asr"][0]["metrics"]["zeroshot"]["protocol"]["n_images"] > 0
    text = terminal_tables(out)
    assert "CLIP (clean data)" in text.split("Table 2")[0]


def test_a_column_added_later_gets_its_base_rate_from_the_saved_clean_model(fm_dir, tmp_path):
    """A clean-data cell finished before a column existed is not retrained: its final checkpoint
    measures the new column, with the same figures the run itself writes."""
    config = _grid(fm_dir, tmp_path)
    cfg = load_config(config, ["attacks.tdpa=none"])
    out = tmp_path / "bench"
    run_bench(cfg, out, quiet=True, only="fm/tdpa/CLIP/")
    path = out / "cells" / "fm__tdpa__CLIP__seed0.json"
    rec = json.loads(path.read_text())
    measured = rec["asr"][0]
    rec["asr"] = []  # as if the cell had finished before the badnet column was in the config
    path.write_text(json.dumps(rec))
    meta = run_bench(cfg, out, quiet=True, only="fm/badnet/")  # a selection on the same data and seed
    assert meta["base_rates_added"] == ["fm/tdpa/CLIP/seed0"] and meta["base_rates_skipped"] == []
    again = json.loads(path.read_text())
    assert again["base_rates_added"] == ["badnet"] and again["fingerprint"] == rec["fingerprint"]
    (added,) = again["asr"]
    assert added["column"] == "badnet" and added["reference"] is True
    assert added["headline"] == measured["headline"] and added["linear_probe"] == measured["linear_probe"]
    assert added["base_rate"] == measured["base_rate"]
    # nothing missing: a further run leaves the JSON alone
    assert run_bench(cfg, out, quiet=True, only="fm/tdpa/CLIP/")["base_rates_added"] == []
    assert json.loads(path.read_text()) == again
    # a column measured on another poisoned set than the grid's is measured again
    again["asr"][0]["manifest"] = str(tmp_path / "elsewhere" / "manifest.json")
    path.write_text(json.dumps(again))
    assert run_bench(cfg, out, quiet=True, only="fm/tdpa/CLIP/")["base_rates_added"] == ["fm/tdpa/CLIP/seed0"]
    assert json.loads(path.read_text())["asr"] == [measured]
    # without the final checkpoint nothing is written, and the run says why
    rec = json.loads(path.read_text())
    rec["asr"] = []
    path.write_text(json.dumps(rec))
    import shutil

    shutil.rmtree(out / rec["run_dir"] / "checkpoints")
    with pytest.warns(UserWarning, match="not measured"):
        meta = run_bench(cfg, out, quiet=True, only="fm/tdpa/CLIP/")
    assert meta["base_rates_added"] == [] and "no checkpoint" in meta["base_rates_skipped"][0]
    assert json.loads(path.read_text()) == rec


def _children(pid: int) -> list[int]:
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            kids.append(int(status.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_killing_a_parallel_bench_stops_its_workers(fm_dir, tmp_path):
    """`--jobs` workers must not outlive a killed `clipguard bench` (they would keep training and
    writing into the bench folder)."""
    config = _grid(fm_dir, tmp_path, epochs=50)
    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, "-m", "clipguard.cli", "bench", str(config), "--out", str(out),
                             "--quiet", "--jobs", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and not any((out / "runs").rglob("results.jsonl")):
        time.sleep(0.2)
    workers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert workers, "no worker process found while the grid was training"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def test_a_finished_cell_keeps_its_weights_not_its_optimizer_and_re_evaluates(fm_dir, tmp_path):
    """The optimizer state, two thirds of a checkpoint, goes once a cell's result is written;
    ``redo`` with the same config resumes the finished run without it and evaluates again."""
    cfg = load_config(_grid(fm_dir, tmp_path))
    out = tmp_path / "bench"
    run_bench(cfg, out, quiet=True, only="badnet/CLIP/", report=False)
    run = out / "runs" / "fm" / "badnet" / "seed0" / "pretrain-CLIP" / "checkpoints"
    final = run / (run / "latest").read_text()
    state = json.loads((final / "state.json").read_text())
    assert (final / "model.safetensors").is_file() and not (final / "optimizer.safetensors").exists()
    assert "optimizer" not in state and state["optimizer_dropped"] is True
    cell = out / "cells" / "fm__badnet__CLIP__seed0.json"
    before = json.loads(cell.read_text())
    meta = run_bench(cfg, out, quiet=True, only="badnet/CLIP/", report=False, redo=True)
    assert meta["cells_run"] == 1
    again = json.loads(cell.read_text())
    assert again["metrics"] == before["metrics"] and again["timings"]["resumed_from_epoch"] == 1
