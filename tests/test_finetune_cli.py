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
            "--eval-data", str(fm_dir / "test.csv"), "--lr-search", "1e-6,5e-3", "--select", "drift"]
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


def test_canary_rule_keeps_the_run_that_leaves_least_of_the_canaries_within_the_budget():
    from clipguard.training.lr_search import Candidate, choose

    c = [Candidate(1e-4, "a", 80.0, 0.2, [60.0, 40.0]), Candidate(1e-3, "b", 78.5, 0.9, [20.0, 10.0]),
         Candidate(3e-3, "c", 76.0, 0.5, [2.0, 1.0])]
    assert choose(c, start_zeroshot=80.5, budget=3, select="canary")[0].lr == 1e-3   # c costs 4.5 points
    assert choose(c, start_zeroshot=80.5, budget=5, select="canary")[0].lr == 3e-3   # lower drift, fewer canaries
    assert choose(c, start_zeroshot=80.5, budget=5, select="drift")[0].lr == 1e-3
    assert choose(c, start_zeroshot=90.0, budget=3, select="canary")[0].lr == 1e-4   # none within: most accurate
    with pytest.raises(ConfigError, match="--select"):
        choose(c, start_zeroshot=80.5, budget=3, select="asr")
    with pytest.raises(ConfigError, match="no canary"):
        choose([Candidate(1e-4, "a", 80.0, 0.2)], start_zeroshot=80.5, budget=3, select="canary")


def test_canary_targets_are_seeded_distinct_and_need_enough_classes():
    from clipguard.training.canary import CanaryOptions, canary_targets

    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    assert canary_targets(names, (9003, 9004)) == ["ankle boot", "sneaker"]   # the measured canaries
    assert canary_targets(names, (5, 5)) == canary_targets(names, (5, 5))
    a, b = canary_targets(names, (5, 5))
    assert a != b                                                            # never one target for two
    with pytest.raises(ConfigError, match="more classes"):
        canary_targets(["a", "b"], (1, 2))
    assert CanaryOptions().count(2000) == 100 and CanaryOptions().count(3) == 1
    for bad in ({"fraction": 0}, {"implant_lr": -1.0}, {"implant_epochs": 0}, {"trigger_seeds": (1,)},
                {"min_asr": 120}):
        with pytest.raises(ConfigError):
            CanaryOptions(**bad)


def test_canary_search_cleans_copies_and_keeps_the_real_run(fm_dir, pretrained, tmp_path):
    from clipguard.data.csv_dataset import load_csv
    from clipguard.training.canary import CanaryOptions
    from clipguard.training.lr_search import lr_search
    from clipguard.training.run import finetune_start
    from clipguard.training.spec import resolve_spec

    weights, name = finetune_start(pretrained)
    spec = resolve_spec(stage="finetune", defense="ft", train=[{"model": name, "checkpoint": weights, "epochs": 1,
                                                                "batch_size": 32, "device": "cpu", "quiet": True}])
    out = tmp_path / "search"
    res = lr_search(spec, [1e-6, 5e-3], 100.0, fm_dir / "train.csv", out, eval_data=fm_dir / "test.csv",
                    select="canary", canary=CanaryOptions(implant_epochs=1, min_asr=0), limit=64)
    assert res["finished"] and res["select"] == "canary"
    k = res["canary"]
    assert k["attacks"] == ["badnet", "blended"] and k["count"] == 3 and len(k["implant"]["asr"]) == 2
    assert k["seed"] == spec.train.seed                                       # the canary rows follow the run
    canary_rows = load_csv(out / "lr-search" / "canary" / "blended" / "train.csv")
    assert len(canary_rows) == 64 + 2 * 3                                     # the limited clean rows + canaries
    for c in res["candidates"]:
        assert len(c["canaries"]) == 2 and (out / "lr-search" / f"canary-lr-{c['lr']:g}" / "results.jsonl").is_file()
    best = min(res["candidates"], key=lambda c: c["canary"])
    assert res["chosen"]["lr"] == best["lr"] and res["within_budget"]         # everything within 100 points
    assert len(set(k["targets"])) == 2                                        # as the manifests record them
    # the kept run is the real one, started from the given model, never from the implanted copy
    chosen = load_file(str(_latest(out / res["chosen"]["folder"]) / "model.safetensors"))
    here = load_file(str(_latest(out) / "model.safetensors"))
    assert all(torch.equal(chosen[k], here[k]) for k in chosen)
    params = json.loads((out / res["chosen"]["folder"] / "params.json").read_text())
    assert "implant" not in json.dumps(params)


def test_canaries_that_do_not_implant_are_a_clear_error(fm_dir, pretrained, tmp_path, capsys):
    args = ["finetune", "--checkpoint", str(pretrained), "--data", str(fm_dir / "train.csv"), "--defense", "ft",
            "--out", str(tmp_path / "s"), "--epochs", "1", "--batch-size", "32", "--limit", "64", "--device", "cpu",
            "--quiet", "--eval-data", str(fm_dir / "test.csv"), "--lr-search", "1e-6", "--select", "canary",
            "--canary-lr", "1e-7"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "canaries did not implant" in err and "--canary-lr" in err


def test_a_search_with_nothing_within_the_budget_warns(fm_dir, pretrained, tmp_path, capsys, monkeypatch):
    from clipguard.training import lr_search as mod

    chosen = {"lr": 1e-4, "folder": "lr-search/lr-0.0001", "zeroshot": 70.0, "drift": 1.0, "canaries": [40.0, 20.0],
              "canary": 30.0}
    res = {"finished": True, "select": "canary", "budget": 3.0, "start_zeroshot": 80.0, "candidates": [chosen],
           "chosen": chosen, "why": "none within the budget: the most accurate", "within_budget": False,
           "canary": {"attacks": ["badnet", "blended"], "targets": ["a", "b"], "implant": {"asr": [90.0, 80.0]}}}
    monkeypatch.setattr(mod, "lr_search", lambda *a, **k: res)
    args = ["finetune", "--checkpoint", str(pretrained), "--data", str(fm_dir / "train.csv"), "--defense", "par",
            "--out", str(tmp_path / "s"), "--eval-data", str(fm_dir / "test.csv"), "--lr-search", "1e-4"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "canaries left 30.0%" in out and "warning: no learning rate kept zero-shot within 3 points" in err
    assert "30% of the canaries are left" in err
    chosen["zeroshot"], res["within_budget"] = 78.0, True                     # within: no warning
    assert main(args) == 0 and "warning" not in capsys.readouterr().err
