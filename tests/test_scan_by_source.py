"""benchmarks/scan_by_source.py: a detector's AUROC per poison source class, from a bench folder."""

import json
import sys

import numpy as np
import pytest
from _benchmarks import load_benchmark


def _bench_folder(tmp_path, shift_scores, labels, parts):
    seed = tmp_path / "runs" / "ds" / "p1" / "seed0" / "scan-CLIP"
    seed.mkdir(parents=True)
    lines = ["row,image,caption,poisoned,part,shift_score,shift_rank,kept"]
    lines += [f"{i},images/{i}.png,a cap,{int(bool(p))},{p},{s},0,1" for i, (s, p) in enumerate(zip(shift_scores, parts))]
    (seed / "scores.csv").write_text("\n".join(lines) + "\n")
    part = tmp_path / "poison" / "ds" / "p1" / "seed0" / "part0-badnet-abc"
    part.mkdir(parents=True)
    (part / "train.csv").write_text("filepath\ttitle\tlabel\n" + "".join(f"x{i}.png\tcap\t{c}\n" for i, c in enumerate(labels)))
    (part / "classes.json").write_text(json.dumps({"classes": ["zero", "one", "two"]}))
    (part / "manifest.json").write_text(json.dumps({
        "attack": "badnet", "target": {"index": 0, "name": "zero"}, "n_rows": len(labels), "classes": "classes.json",
        "csv": {"img_key": "filepath", "caption_key": "title", "label_key": "label", "separator": "\t"}}))
    return tmp_path


@pytest.mark.parametrize("part_name", ["badnet", "p1:badnet"])
def test_auroc_per_source_class_against_every_clean_pair(tmp_path, monkeypatch, capsys, part_name):
    mod = load_benchmark("scan_by_source")
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, 200)
    near = rng.normal(0.5, 1, 20)   # poisons from class one: half mixed with the clean pairs
    far = rng.normal(10, 1, 20)     # poisons from class two: all above them
    scores = np.r_[clean, near, far]
    labels = [int(i % 3) for i in range(200)] + [1] * 20 + [2] * 20
    parts = [""] * 200 + [part_name] * 40
    out = _bench_folder(tmp_path, scores, labels, parts)
    fig = mod.by_source(out / "runs/ds/p1/seed0/scan-CLIP/scores.csv", np.array(labels), "shift")
    from sklearn.metrics import roc_auc_score
    want = 100 * roc_auc_score(np.r_[np.zeros(200), np.ones(20)], np.r_[clean, near])
    assert fig[part_name]["1"] == (20, pytest.approx(want)) and fig[part_name]["2"] == (20, 100.0)
    monkeypatch.setattr(sys, "argv", ["scan_by_source", str(out), "--dataset", "ds", "--json", str(tmp_path / "f.json")])
    mod.main()
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"seed0 {part_name}") and "target zero" in line and line.index("one") < line.index("two")
    assert json.loads((tmp_path / "f.json").read_text())["seed0"][part_name]["sources"]["two"] == [20, 100.0]


def test_a_missing_detector_column_is_a_clear_error(tmp_path):
    mod = load_benchmark("scan_by_source")
    out = _bench_folder(tmp_path, [0.1, 0.2], [0, 1], ["", "badnet"])
    with pytest.raises(SystemExit, match="no column 'dao_score'"):
        mod.by_source(out / "runs/ds/p1/seed0/scan-CLIP/scores.csv", np.array([0, 1]), "dao")
