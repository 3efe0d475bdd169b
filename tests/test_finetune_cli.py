"""``clipguard finetune``: starts from the checkpoint's weights with a fresh optimizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clipguard.cli import main
from clipguard.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def pretrained(fm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["train", "--data", str(fm_dir / "train.csv"), "--out", str(out), "--epochs", "1",
                 "--batch-size", "64", "--limit", "128", "--device", "cpu", "--quiet", "--seed", "0"]) == 0
    return out


def _latest(run):
    c = run / "checkpoints"
    return c / (c / "latest").read_text().strip()


@pytest.mark.parametrize("defense", ["ft", "cleanclip", "cleanerclip"])
def test_finetune_starts_from_checkpoint_with_fresh_optimizer(fm_dir, pretrained, tmp_path, defense):
    out = tmp_path / defense
    rc = main(["finetune", "--checkpoint", str(pretrained), "--data", str(fm_dir / "train.csv"),
               "--defense", defense, "--out", str(out), "--epochs", "1", "--batch-size", "32",
               "--limit", "64", "--lr", "0", "--device", "cpu", "--quiet",
               "--opt", "fc_samples=16"] if defense == "cleanerclip" else
              ["finetune", "--checkpoint", str(pretrained), "--data", str(fm_dir / "train.csv"),
               "--defense", defense, "--out", str(out), "--epochs", "1", "--batch-size", "32",
               "--limit", "64", "--lr", "0", "--device", "cpu", "--quiet"])
    assert rc == 0
    params = json.loads((out / "params.json").read_text())
    assert params["defense"] == defense
    assert params["train"]["model"] == "cg-tiny"                     # from the checkpoint's state.json
    assert params["train"]["checkpoint"].endswith("model.safetensors")
    # cg-tiny's recipe (CleanerCLIP warms up longer)
    assert params["train"]["weight_decay"] == 0.1 and params["train"]["warmup"] == (62 if defense == "cleanerclip" else 20)
    # lr 0: the weights must be exactly the pre-trained ones (so training started from them)
    before = load_file(str(_latest(pretrained) / "model.safetensors"))
    after = load_file(str(_latest(out) / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # fresh optimizer: its step count is this run's 2 steps, not pre-training's 2 + 2
    state = json.loads((_latest(out) / "state.json").read_text())
    steps = {v for k, v in state["optimizer"]["scalars"].items() if k.endswith(".step")}
    opt = load_file(str(_latest(out) / "optimizer.safetensors"))
    steps |= {float(v) for k, v in opt.items() if k.endswith(".step")}
    assert steps == {2.0}


def test_finetune_learns_with_a_preset(fm_dir, pretrained, tmp_path):
    out = tmp_path / "preset"
    assert main(["finetune", "--checkpoint", str(_latest(pretrained)), "--data", str(fm_dir / "train.csv"),
                 "--preset", "configs/cleanclip.yaml", "--out", str(out), "--epochs", "1",
                 "--batch-size", "32", "--limit", "64", "--device", "cpu", "--quiet"]) == 0
    params = json.loads((out / "params.json").read_text())
    assert params["defense"] == "cleanclip" and params["strategy"]["lambda2"] == 1.0
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert rec["inmodal_loss"] > 0


def test_finetune_bad_checkpoint_is_clear(fm_dir, tmp_path, capsys):
    rc = main(["finetune", "--checkpoint", str(tmp_path / "nope"), "--data", str(fm_dir / "train.csv"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_a_torch_save_state_dict_with_ddp_prefixes_evaluates_like_its_run_folder(fm_dir, pretrained, tmp_path):
    """The acceptance check of 'any open_clip checkpoint in': the same weights, saved as open_clip's
    training code saves them under DDP, give exactly the run folder's zero-shot figures."""
    import clipguard

    sd = load_file(str(_latest(pretrained) / "model.safetensors"))
    pt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, pt)
    a = clipguard.evaluate(pretrained, fm_dir / "test.csv")["metrics"]["zeroshot"]
    b = clipguard.evaluate(pt, fm_dir / "test.csv", model="cg-tiny")["metrics"]["zeroshot"]
    assert a == b and a["n_images"] == 200


def test_lr_search_rule_prefers_the_farthest_run_within_the_budget():
    from clipguard.training.lr_search import Candidate, choose, parse_lrs

    c = [Candidate(1e-4, "a", 80.0, 0.2), Candidate(1e-3, "b", 78.5, 0.5), Candidate(3e-3, "c", 76.0, 0.9)]
    assert choose(c, start_zeroshot=80.5, budget=3)[0].lr == 1e-3        # c moves most but costs 4.5
    assert choose(c, start_zeroshot=80.5, budget=5)[0].lr == 3e-3
    best, why = choose(c, start_zeroshot=90.0, budget=3)                   # none within: the most accurate
    assert best.lr == 1e-4 and "none within" in why
    assert parse_lrs("3e-3, 1e-4,1e-4") == [1e-4, 3e-3]
    for bad in ("", "fast", "0,1e-3", "-1e-3"):
        with pytest.raises(ConfigError, match="--lr-search"):
            parse_lrs(bad)


def test_lr_search_runs_each_rate_and_leaves_the_chosen_run_in_out(fm_dir, pretrained, tmp_path, capsys):
    import clipguard

    out = tmp_path / "search"
    args = ["finetune", "--checkpoint", str(pretrained), "--data", str(fm_dir / "train.csv"), "--defense", "ft",
            "--out", str(out), "--epochs", "1", "--batch-size", "32", "--limit", "64", "--device", "cpu", "--quiet",
            "--eval-data", str(fm_dir / "test.csv"), "--lr-search", "1e-6,5e-3"]
    assert main(args + ["--budget", "100"]) == 0
    res = json.loads((out / "lr-search.json").read_text())
    assert [c["lr"] for c in res["candidates"]] == [1e-6, 5e-3]
    assert all((out / c["folder"] / "results.jsonl").is_file() for c in res["candidates"])
    assert res["candidates"][1]["drift"] > res["candidates"][0]["drift"] >= 0
    assert res["chosen"]["lr"] == 5e-3                       # any cost is within a 100-point budget
    # OUT is now that run: same weights, and `evaluate` reads it like any run folder
    chosen = load_file(str(_latest(out / res["chosen"]["folder"]) / "model.safetensors"))
    here = load_file(str(_latest(out) / "model.safetensors"))
    assert all(torch.equal(chosen[k], here[k]) for k in chosen)
    assert clipguard.evaluate(out, fm_dir / "test.csv")["metrics"]["zeroshot"]["n_images"] == 200
    assert "<- chosen" in capsys.readouterr().out
    # a finished search is never silently redone; --resume returns it, --overwrite runs it again
    assert main(args) == 2 and "already holds a finished learning-rate search" in capsys.readouterr().err
    assert main(args + ["--resume", "latest"]) == 0
    assert main(args + ["--overwrite", "--budget", "0"]) == 0
    assert json.loads((out / "lr-search.json").read_text())["budget"] == 0
    # a search needs clean validation data, and sets the learning rate itself
    no_eval = [a for a in args if a not in ("--eval-data", str(fm_dir / "test.csv"))]
    assert main(no_eval[:-2] + ["--out", str(tmp_path / "x"), "--lr-search", "1e-3"]) == 2
    assert main(args + ["--out", str(tmp_path / "y"), "--lr", "1e-3"]) == 2
