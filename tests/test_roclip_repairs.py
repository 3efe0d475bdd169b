"""benchmarks/roclip_repairs.py at a tiny size: a RoCLIP run's checkpoint, pairs matched against
pools of training captions, every row printed."""

import csv

import pytest
from _benchmarks import load_benchmark

from clipguard import defenses
from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import load_csv
from clipguard.data.fashion_mnist import materialise
from clipguard.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_roclip_repairs_reports_agreement_and_the_margins(tmp_path, capsys):
    root = materialise(tmp_path / "fm", train_size=256, test_size=10, seed=0)
    rows = list(csv.DictReader(open(root / "train.csv"), delimiter="\t"))
    info = ClassInfo.load(root / "classes.json")
    for r in rows[:8]:  # eight pairs captioned with another class: the mismatched ones
        other = info.classes[(int(r["label"]) + 1) % len(info.classes)]
        r["title"] = f"a photo of a {other}."
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    bench = load_benchmark("roclip_repairs")
    named = bench.caption_classes(["a photo of a sneaker.", "a close-up of a parka.", "nothing here"], info)
    assert named.tolist() == [info.classes.index("sneaker"), info.classes.index("coat"), -1]
    run = tmp_path / "run"
    Trainer(TrainConfig(model="cg-nano", epochs=1, batch_size=64, seed=0, device="cpu", quiet=True),
            load_csv(root / "train.csv"), run, strategy=defenses.build("roclip", {})).fit()
    out = bench.main(["--run", str(run), "--data", str(root / "train.csv"), "--model", "cg-nano",
                      "--pools", "2", "--pool-fraction", "0.1", "--margins", "1.0"])
    printed = capsys.readouterr().out
    assert "(8 mismatched)" in printed
    for key in ("clean pairs that agree", "re-paired clean pairs picking their own class",
                "median gap, re-paired clean pairs", "median gap, mismatched pairs", "mismatched pairs that agree",
                "margin 1: clean pairs kept", "margin 1: mismatched pairs kept"):
        assert key in printed and key in out, key
    assert 0 <= out["clean pairs that agree"] <= out["margin 1: clean pairs kept"] <= 1
    assert out["mismatched pairs that agree"] <= out["margin 1: mismatched pairs kept"] <= 8
    with pytest.raises(SystemExit):
        bench.main(["--run", str(tmp_path / "nothing"), "--data", str(root / "train.csv"), "--model", "cg-nano"])
