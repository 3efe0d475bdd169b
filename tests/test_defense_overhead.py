"""benchmarks/defense_overhead.py at a tiny size: every phase of SafeCLIP and RoCLIP is reached,
every row is printed with a figure and its spread over two repeats, and a bad option is refused."""

import json

import pytest
from _benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = {"SafeCLIP wall / CLIP wall (default schedule)": "safeclip_wall_over_clip",
        "RoCLIP wall / CLIP wall": "roclip_wall_over_clip",
        "SafeCLIP unimodal epoch": "safeclip_unimodal_epoch_in_clip_epochs",
        "SafeCLIP low-lr CLIP epoch": "safeclip_low_lr_epoch_in_clip_epochs",
        "SafeCLIP mixed epoch, split included": "safeclip_mixed_epoch_in_clip_epochs",
        "  the same, after the first split": "safeclip_later_mixed_epoch_in_clip_epochs",
        "first split (scores + GMM)": "first_split_in_clip_epochs",
        "  GMM alone": "gmm_fit_in_clip_epochs",
        "one split update (top-q re-evaluation)": "split_update_in_clip_epochs",
        "RoCLIP pool epoch": "roclip_pool_epoch_in_clip_epochs",
        "RoCLIP other epochs (plain CLIP, plain_views)": "roclip_clip_epoch_in_clip_epochs"}


def test_defense_overhead_prints_every_row(fm_dir, capsys):
    # 4 epochs: unimodal, low-lr CLIP, two mixed (the first split and an update); RoCLIP's epoch 2 pools
    # (its default waits for a model that has left chance, which 256 pairs never do: the option lifts it)
    load_benchmark("defense_overhead").main(["--data", str(fm_dir / "train.csv"), "--pairs", "256",
                                             "--batch-size", "32", "--epochs", "4", "--warmup-epochs", "1",
                                             "--safeclip-opt", "clip_warmup_epochs=1", "--repeats", "2",
                                             "--roclip-opt", "align_before_pool=null"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("data: 256 pairs, 4 epochs, cg-nano on cpu") and "medians of 2 repeat(s)" in lines[0]
    res = json.loads(lines[-1])
    assert len(lines) == len(ROWS) + 2
    for line, (label, key) in zip(lines[1:-1], ROWS.items()):
        assert line.startswith(label) and res[key] is not None and res[key] > 0, (label, line)
        lo, hi = res[key + "_range"]
        assert f"{res[key]}  [{lo}, {hi}]" in line, line
    assert res["safeclip_options"] == {"warmup_epochs": 1, "clip_warmup_epochs": 1}
    assert res["roclip_options"] == {"align_before_pool": None}


@pytest.mark.parametrize("flag", ["--safeclip-opt", "--roclip-opt"])
def test_a_bad_defence_option_is_refused(flag):
    with pytest.raises(SystemExit):
        load_benchmark("defense_overhead").main([flag, "bogus=1"])
