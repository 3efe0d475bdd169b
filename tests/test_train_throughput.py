"""benchmarks/train_throughput.py at a tiny size: both repeat orders run, and every line is printed."""

import pytest
from _benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_throughput_prints_every_line(fm_dir, capsys):
    load_benchmark("train_throughput").main(["--data", str(fm_dir / "train.csv"), "--pairs", "128",
                                             "--model", "cg-nano", "--batch-size", "32", "--repeats", "2",
                                             "--trim-text"])
    out = capsys.readouterr().out
    for r in (1, 2):  # ours first, then the minimal loop first
        assert f"repeat {r}: clipguard loop " in out and "minimal open_clip loop" in out, r
    assert out.count(", clipguard with trim_text ") == 2
    assert "cg-nano, 128 pairs, batch 32, 1 epoch(s)" in out and "medians of 2" in out
    for what in ("training loop only", "end to end (set-up, tokenising, checkpoints)"):
        assert f"{what}: clipguard " in out and f"{what}: clipguard with trim_text " in out, what
    assert out.count("(target >= 1.0)") == 2 and out.count("ratio to the minimal loop") == 2
    with pytest.raises(SystemExit):
        load_benchmark("train_throughput").main(["--repeats", "two"])
