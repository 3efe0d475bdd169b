"""SafeCLIP under two gloo ranks: shards gathered, one split broadcast, identical on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("safeclip_ddp_worker.py")


@pytest.mark.slow
def test_split_is_made_once_and_identical_on_all_ranks(fm_dir, tmp_path, free_port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", free_port, str(WORKER), str(fm_dir / "train.csv"), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert torch.equal(r0["safe"], r1["safe"]) and torch.equal(r0["sims"], r1["sims"])
    assert all(torch.equal(r0[k], r1[k]) for k in r0 if k.startswith("w."))
    safe = r0["safe"].bool()
    assert safe.shape == (130,) and 0 < int(safe.sum()) < 130  # safe and risky: a mask and its complement
    # the gathered shard similarities equal a single-process pass over every pair with those weights
    from clipguard.data.csv_dataset import load_csv
    from clipguard.evaluation.features import encode_images, encode_tokens
    from clipguard.models.factory import create_model, get_tokenizer

    model = create_model("cg-tiny")
    model.load_state_dict({k[2:]: v for k, v in r0.items() if k.startswith("w.")})
    data = load_csv(fm_dir / "train.csv").subset(range(130))
    img = encode_images(model, data.images, "cpu")
    txt = encode_tokens(model, get_tokenizer("cg-tiny")(data.captions), "cpu")
    assert torch.allclose((img * txt).sum(1), r0["sims_now"], atol=1e-5)


@pytest.mark.slow
def test_split_updates_from_the_steps_features_are_identical_on_all_ranks(fm_dir, tmp_path, free_port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = '{"epochs": 4, "warmup_epochs": 0, "update_features": "steps", "update_fraction": 1.0}'
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", free_port, str(WORKER), str(fm_dir / "train.csv"), str(tmp_path), extra],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    f0, f1 = (load_file(str(tmp_path / f"features{i}.safetensors"))["features"] for i in (0, 1))
    assert torch.equal(r0["safe"], r1["safe"]) and torch.equal(r0["sims"], r1["sims"]) and torch.equal(f0, f1)
    assert bool(f0.float().abs().sum(dim=1).gt(0).all())  # every pair has features
    recs = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    updates = [x for x in recs if x.get("phase") == "mixed" and not x.get("first_split")]
    assert updates and all(x["reused_features"] > 0 for x in updates)
