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


def test_the_minimal_loop_with_clipping_does_the_trainers_per_step_work(fm_dir, capsys):
    load_benchmark("train_throughput").main(["--data", str(fm_dir / "train.csv"), "--pairs", "128",
                                             "--model", "cg-nano", "--batch-size", "32", "--repeats", "3",
                                             "--with-clipping"])
    out = capsys.readouterr().out
    assert out.count(", minimal loop with clipping and clamp ") == 3
    for what in ("training loop only", "end to end (set-up, tokenising, checkpoints)"):
        assert f"{what}: minimal loop with clipping and clamp " in out and "clipguard's ratio to it" in out, what


def test_the_clipping_loop_calls_torchs_clipping_at_the_given_norm(fm_dir, monkeypatch):
    """The like-for-like contestant really calls torch's clipping, once a step, at the norm given."""
    import torch

    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        calls.append(max_norm)
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    tt = load_benchmark("train_throughput")
    from clipguard.data.csv_dataset import load_csv

    data = load_csv(fm_dir / "train.csv").subset(range(64))
    tt.minimal_loop(data, "cg-nano", 1, 32, 1e-3, 0)
    assert calls == []
    tt.minimal_loop(data, "cg-nano", 1, 32, 1e-3, 0, grad_clip=1.0)
    assert calls == [1.0, 1.0]
