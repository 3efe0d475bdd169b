"""benchmarks/roclip_step_profile.py at a tiny size: every row is timed and printed."""

import pytest
from _benchmarks import BENCHMARKS, load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_roclip_step_profile_prints_every_part(fm_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its sibling scripts, as when run from benchmarks/
    load_benchmark("roclip_step_profile").main(["--data", str(fm_dir / "train.csv"), "--pairs", "256",
                                                "--batch-size", "32", "--steps", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = ("pool step (unmatched: drop)", "pool step (unmatched: pooled)", "plain step (plain_views: original-after-pool)",
            "plain step (plain_views: augmented)", "own captions: EDA + tokenise + no-grad encode",
            "own captions: EDA + tokenise only", "pick + rank", "diagnostics record", "pool update",
            "veto, once a run: high-passed pixels", "veto, once a run: their shrunk inverse covariance",
            "veto, each pool epoch: encode every caption", "veto, each pool epoch: caption groups (k-means)",
            "veto, each pool epoch: pattern scores", "veto, each pool epoch: all of it")
    assert len(lines) == len(rows)
    for row, line in zip(rows, lines):
        assert line.startswith(row) and line.endswith(" ms"), (row, line)
        assert float(line[len(row):-3]) >= 0
    with pytest.raises(SystemExit):
        load_benchmark("roclip_step_profile").main(["--steps", "one"])
