import json

import pytest

from clipguard.cli import main


def test_train_then_evaluate_cli(fm_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(fm_dir / "train.csv"), "--eval-data", str(fm_dir / "test.csv"),
                 "--epochs", "1", "--batch-size", "64", "--out", str(run), "--quiet", "--limit", "256"]) == 0
    rec = json.loads((run / "results.jsonl").read_text().splitlines()[0])
    assert {"loss", "lr", "seconds", "zeroshot_top1", "images_per_s"} <= rec.keys()
    out = tmp_path / "res.json"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(fm_dir / "test.csv"),
                 "--probe-data", str(fm_dir / "train.csv"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["metrics"]
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):]) == m  # what it prints is what it wrote
    assert res["model"] == "cg-tiny" and m["zeroshot"]["n_images"] == 200
    assert 0 <= m["zeroshot"]["acc1"] <= m["zeroshot"]["acc5"] <= 1
    assert "acc1" in m["linear_probe"] and "image_retrieval_recall@10" in m["retrieval"]
    assert m["linear_probe"]["C_source"] == "validation" and m["linear_probe"]["C"] > 0
    assert 0 <= m["linear_probe"]["val_acc1"] <= 1 and m["linear_probe"]["n_val"] > 0


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r"),
                 "--defense", "nonexistent"]) == 2
    assert "unknown defense" in capsys.readouterr().err


def test_unknown_model(fm_dir, tmp_path, capsys):
    assert main(["train", "--data", str(fm_dir / "train.csv"), "--out", str(tmp_path / "r"),
                 "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_learns_fashion_mnist(tmp_path):
    """Real data, real model: a few epochs on 3k pairs must beat chance (10%) by far."""
    from clipguard.data.fashion_mnist import materialise

    d = materialise(tmp_path / "fm", train_size=3000, test_size=500, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(d / "train.csv"), "--eval-data", str(d / "test.csv"),
                 "--epochs", "4", "--out", str(run), "--quiet", "--seed", "1"]) == 0
    last = json.loads((run / "results.jsonl").read_text().splitlines()[-1])
    assert last["zeroshot_top1"] > 0.3
