"""Two gloo processes under torchrun: identical parameters on both ranks, and the same update as
one process holding the whole global batch (the loss gathers features with local gradient)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_two_ranks_stay_identical_and_match_single_process(fm_dir, tmp_path, free_port):
    csv = str(fm_dir / "train.csv")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port,
          str(WORKER), csv, str(tmp_path / "ddp"), "32"])
    r0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert (tmp_path / "ddp" / "find_unused0.txt").read_text() == "False"
    _run([sys.executable, str(WORKER), csv, str(tmp_path / "single"), "64"])
    s = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    for k in r0:
        assert torch.allclose(r0[k], s[k], atol=2e-5, rtol=1e-4), k


def test_loss_values_and_gradients_match_one_process_including_the_logit_scale(tmp_path, free_port):
    """Under DDP the loss is the global batch's on every rank; the features' gradient reaches
    each rank through its own rows only, while the logit scale (or a learned temperature) is held
    whole by every rank: after DDP's average its gradient must equal one process's, not the world
    size times it."""
    worker = Path(__file__).with_name("loss_grad_worker.py")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port,
          str(worker), str(tmp_path / "ddp.safetensors")])
    _run([sys.executable, str(worker), str(tmp_path / "single.safetensors")])
    d = load_file(str(tmp_path / "ddp.safetensors"))
    s = load_file(str(tmp_path / "single.safetensors"))
    for k in s:
        assert torch.allclose(d[k], s[k], atol=1e-6, rtol=1e-5), (k, d[k], s[k])


@pytest.mark.slow
def test_the_cli_under_torchrun_finishes_and_speaks_once(fm_dir, tmp_path, free_port):
    """`torchrun -m clipguard.cli train` as docs/scale.md shows it: both ranks exit cleanly (the
    process group is left before the interpreter tears down), and the run's warnings and result
    line come from rank 0 only."""
    out = tmp_path / "run"
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port,
              "-m", "clipguard.cli", "train", "--data", str(fm_dir / "train.csv"), "--model", "cg-tiny",
              "--epochs", "3", "--batch-size", "32", "--defense", "safeclip", "--quiet", "--out", str(out)])
    assert r.stdout.count("finished: ") == 1, r.stdout
    warned = [line for line in r.stderr.splitlines() if line.startswith("WARNING safeclip")]
    assert warned and len(warned) == len(set(warned)), r.stderr[-3000:]
    assert json.loads((out / "params.json").read_text())["world_size"] == 2
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_roclip_holds_back_pool_epochs_alike_on_every_rank(fm_dir, tmp_path, free_port):
    """RoCLIP's align_before_pool decides from the loss of every rank (one all-reduce at the
    epoch's start): both ranks take the same epochs as pool epochs and finish together."""
    out = tmp_path / "run"
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port,
              "-m", "clipguard.cli", "train", "--data", str(fm_dir / "train.csv"), "--model", "cg-tiny",
              "--epochs", "3", "--batch-size", "32", "--defense", "roclip", "--opt", "match_every=1",
              "--opt", "align_before_pool=0.97", "--quiet", "--out", str(out)])
    assert r.stdout.count("finished: ") == 1, r.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["pool_deferred"] and rows[0]["pool_epoch"] is False  # no plain epoch before the first
    assert all("plain_loss_vs_chance" in row for row in rows[1:] if row.get("pool_deferred") or row["pool_epoch"])
