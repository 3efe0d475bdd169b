"""benchmarks/scan_passes.py: two cells' scores as one detector, AUROC per part against scikit-learn."""

import numpy as np
import pytest
from _benchmarks import load_benchmark
from sklearn.metrics import roc_auc_score


def _cell(root, name, scores, parts):
    d = root / "runs" / "ds" / "p1" / "seed0" / name
    d.mkdir(parents=True)
    lines = ["row,image,caption,poisoned,part,shift_score,shift_rank,kept"]
    lines += [f"{i},images/{i}.png,a cap,{int(bool(p))},{p},{s},0,1" for i, (s, p) in enumerate(zip(scores, parts))]
    (d / "scores.csv").write_text("\n".join(lines) + "\n")


def test_each_scan_and_their_mean_rank_share(tmp_path, capsys):
    mod = load_benchmark("scan_passes")
    rng = np.random.default_rng(0)
    parts = [""] * 300 + ["p1:badnet"] * 20 + ["p1:blended"] * 20
    # the first scan sees BadNet, the second Blended: each alone misses one, together they see both
    a = np.r_[rng.normal(0, 1, 300), rng.normal(4, 1, 20), rng.normal(0, 1, 20)]
    b = np.r_[rng.normal(0, 1, 300), rng.normal(0, 1, 20), rng.normal(4, 1, 20)]
    _cell(tmp_path, "scan-A", a, parts)
    _cell(tmp_path, "scan-B", b, parts)
    mod.main([str(tmp_path), "scan-A", "scan-B", "--dataset", "ds"])
    out = capsys.readouterr().out
    figs = mod.part_aurocs(tmp_path / "runs/ds/p1/seed0/scan-A/scores.csv",
                           tmp_path / "runs/ds/p1/seed0/scan-B/scores.csv", "shift")
    y = np.r_[np.zeros(300), np.ones(20)]
    assert figs["p1:badnet"]["first"] == pytest.approx(100 * roc_auc_score(y, np.r_[a[:300], a[300:320]]))
    assert figs["p1:blended"]["second"] == pytest.approx(100 * roc_auc_score(y, np.r_[b[:300], b[320:]]))
    from clipguard.detection.runner import rank_shares

    comb = (rank_shares(a) + rank_shares(b)) / 2
    assert figs["p1:blended"]["combined"] == pytest.approx(100 * roc_auc_score(y, np.r_[comb[:300], comb[320:]]))
    assert figs["p1:badnet"]["second"] < 70 < figs["p1:badnet"]["combined"]
    assert "mean over 1 seeds" in out and "p1:blended" in out
    with pytest.raises(SystemExit, match="missing"):
        mod.main([str(tmp_path), "scan-A", "scan-C", "--dataset", "ds"])
