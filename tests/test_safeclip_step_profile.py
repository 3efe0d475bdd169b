"""benchmarks/safeclip_step_profile.py at a tiny size: every row is timed and printed."""

import pytest
from _benchmarks import BENCHMARKS, load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_safeclip_step_profile_prints_every_part(fm_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its sibling scripts, as when run from benchmarks/
    load_benchmark("safeclip_step_profile").main(["--data", str(fm_dir / "train.csv"), "--pairs", "256",
                                                  "--batch-size", "32", "--steps", "1", "--risky", "0.5"])
    out = capsys.readouterr().out
    for row in ("plain CLIP step", "SafeCLIP mixed step", "risky rows' image views", "EDA captions",
                "forward + backward of batch + risky views", "nearest-neighbour losses", "first split",
                "one split update", "risky_loss: one-view", "update_features: steps", "re-used"):
        assert row in out, row
    assert "risky share 0.50" in out
    with pytest.raises(SystemExit):
        load_benchmark("safeclip_step_profile").main(["--risky", "2"])
