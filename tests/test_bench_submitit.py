"""clipguard bench --executor local|slurm: cells as submitit jobs.

Fast: the flags and their checks, the missing-submitit error, the sbatch script a SLURM grid
submits (against a fake sbatch), the torch.distributed variables of a task in a fake SLURM job,
and the driver's scheduling against a fake backend (bases first, a failed base's dependents not
run, jobs of an earlier driver waited for). Slow: a tiny grid through submitit's LocalExecutor
gives the same cells as the default executor and a rerun submits nothing; a failing cell is
reported with its log while a two-task (DDP) cell finishes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_bench_run import _grid

from clipguard.bench.cell import cell_config, fingerprint, is_done
from clipguard.bench.config import parse_config
from clipguard.bench.plan import plan_cells
from clipguard.bench.submit import (
    LEDGER,
    CellJob,
    SubmititBackend,
    SubmitOptions,
    distributed_env,
    error_line,
    parse_mem_gb,
    run_submitted,
)
from clipguard.cli import main
from clipguard.commands.bench import run_grid, submit_options
from clipguard.errors import ConfigError

GRID = {
    "name": "t",
    "seeds": [0],
    "datasets": {"fm": {"builtin": "fashion-mnist", "train_size": 200, "test_size": 100}},
    "attacks": {"badnet": {"attack": "badnet", "target": "bag", "rate": 0.05},
                "blended": {"attack": "blended", "target": "bag", "rate": 0.05}},
    "pretrain": {"train": {"epochs": 1}, "defenses": {"CLIP": "none", "SafeCLIP": "safeclip"}},
    "finetune": {"train": {"epochs": 1, "lr": 1e-5}, "defenses": {"FT": "ft"}},
}


# ---------------------------------------------------------------------------- options
def test_flags_map_to_submit_options_and_bad_combinations_are_refused():
    opts = submit_options("slurm", {"partition": "gpu", "timeout_min": 240, "nodes": 2, "gpus_per_node": 4,
                                    "mem_gb": "64G", "additional": ["account=proj", "exclusive"],
                                    "array_parallelism": 8}, jobs=1)
    assert (opts.ntasks_per_node, opts.ntasks, opts.mem_gb, opts.max_in_flight) == (4, 8, 64.0, 8)
    assert opts.additional == {"account": "proj", "exclusive": True}
    params = opts.parameters("clipguard-t")
    assert params["tasks_per_node"] == 4 and params["slurm_partition"] == "gpu" and params["timeout_min"] == 240
    assert submit_options("pool", {}, jobs=2) is None
    local = submit_options("local", {}, jobs=2)
    assert local.max_in_flight == 2 and local.parameters("x")["timeout_min"] >= 24 * 60  # not submitit's 2 min
    assert local.parameters("x")["gpus_per_node"] == 0  # a local job sees no GPU unless asked
    assert (parse_mem_gb("500M"), parse_mem_gb("1.5T"), parse_mem_gb(32)) == (500 / 1024, 1536.0, 32.0)
    for executor, slurm, jobs, message in [
        ("pool", {"partition": "gpu"}, 1, "--slurm-partition: only with --executor slurm"),
        ("slurm", {}, 1, "--slurm-time"),
        ("slurm", {"timeout_min": 60}, 2, "--jobs is for the local"),
        ("local", {"nodes": 2}, 1, "--slurm-nodes must be 1"),
        ("local", {"partition": "gpu"}, 1, "only for --executor slurm"),
        ("slurm", {"timeout_min": 60, "gpus_per_node": -1}, 1, "--slurm-gpus-per-node must be >= 0"),
        ("slurm", {"timeout_min": 60, "mem_gb": "lots"}, 1, "not a memory size"),
    ]:
        with pytest.raises(ConfigError, match=message):
            submit_options(executor, slurm, jobs)


def test_missing_submitit_names_the_extra(tmp_path, monkeypatch, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(GRID))
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    rc = main(["bench", str(config), "--out", str(tmp_path / "b"), "--executor", "slurm", "--slurm-time", "60"])
    err = capsys.readouterr().err
    assert rc == 2 and "submitit" in err and "pip install 'clipguard[slurm]'" in err
    assert not (tmp_path / "b").exists()  # refused before any work
    # the default executor does not need it
    assert run_grid(str(config), str(tmp_path / "b"), plan=True) == 0
    assert "todo  fm/badnet/CLIP/seed0" in capsys.readouterr().out


# ---------------------------------------------------------------------------- inside a job
def _fake_slurm_task(monkeypatch, procid: int, localid: int, **extra: str) -> None:
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                          "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(k)
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NODEID": str(procid // 4), "SLURM_JOB_NODELIST": "gpu[012-013]",
           "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), **extra}
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_torch_distributed_variables_from_a_fake_slurm_job(monkeypatch):
    """2 nodes x 4 GPUs: the 6th task (node 1, local rank 1) gets what torchrun would give it."""
    _fake_slurm_task(monkeypatch, procid=5, localid=1)
    env = distributed_env()
    assert {k: env[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")} == {
        "MASTER_ADDR": "gpu012", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000
    assert "CUDA_VISIBLE_DEVICES" not in env  # a task sees its node's GPUs and takes cuda:LOCAL_RANK
    _fake_slurm_task(monkeypatch, procid=0, localid=0)
    first = distributed_env()
    assert first["RANK"] == "0" and first["MASTER_PORT"] == env["MASTER_PORT"]  # every task agrees
    _fake_slurm_task(monkeypatch, procid=0, localid=0, SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="2")
    assert distributed_env()["MASTER_ADDR"] == "gpu012"  # a cell of a job array
    # the variables clipguard/training/distributed.py:init_distributed reads
    assert {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"} <= set(env)


def test_local_job_tasks_meet_on_this_machine(monkeypatch):
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_")) or k == "MASTER_PORT"]:
        monkeypatch.delenv(k)
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "777", "SUBMITIT_LOCAL_NTASKS": "2",
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                 "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        monkeypatch.setenv(k, v)
    env = distributed_env()
    assert (env["MASTER_ADDR"], env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("127.0.0.1", "1", "2", "1")


# ---------------------------------------------------------------------------- SLURM submission
def _fake_slurm_bin(tmp_path: Path, monkeypatch) -> Path:
    """srun (so submitit sees a cluster), sbatch (answers a job id) and sacct (knows nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"srun": "exit 0", "sbatch": f'echo "$1" >> {bin_dir}/sbatch.calls; echo "Submitted batch job 4242"',
               "sacct": 'echo "JobID|State|NodeList"'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_slurm_cells_become_one_job_array_with_the_asked_resources(tmp_path, monkeypatch):
    bin_dir = _fake_slurm_bin(tmp_path, monkeypatch)
    cfg = parse_config(GRID)
    opts = SubmitOptions("slurm", timeout_min=240, partition="gpu", nodes=2, gpus_per_node=4, cpus_per_task=8,
                         mem_gb=64, array_parallelism=3, additional={"account": "proj", "exclusive": True},
                         setup=["module load cuda"])
    backend = SubmititBackend(opts, tmp_path / "out" / "slurm", "clipguard-t")
    cells = plan_cells(cfg)[:2]
    handles = backend.submit([CellJob(cfg, str(tmp_path / "out"), c.id) for c in cells])
    assert [h.job_id for h in handles] == ["4242_0", "4242_1"] and all(h.ntasks == 8 for h in handles)
    script = (tmp_path / "out" / "slurm" / "4242_submission.sh").read_text()
    for line in ["#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=64GB", "#SBATCH --account=proj", "#SBATCH --exclusive",
                 "#SBATCH --job-name=clipguard-t", "module load cuda", "--kill-on-bad-exit=1"]:
        assert line in script, line
    assert (tmp_path / "out" / "slurm" / "4242_0_submitted.pkl").is_file()
    assert len((bin_dir / "sbatch.calls").read_text().splitlines()) == 1  # one sbatch for the whole array
    # a job sacct does not know (purged, or never ran) is not waited for by a rerun
    assert backend.reattach({"executor": "slurm", "job_id": "4242_0", "tasks": 8}) is None


def test_a_refused_submission_is_a_clear_error(tmp_path, monkeypatch):
    bin_dir = _fake_slurm_bin(tmp_path, monkeypatch)
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpux' >&2\nexit 1\n")
    cfg = parse_config(GRID)
    backend = SubmititBackend(SubmitOptions("slurm", timeout_min=5, partition="gpux"), tmp_path / "slurm", "x")
    with pytest.raises(ConfigError, match="submitting 1 cell.*invalid partition"):
        backend.submit([CellJob(cfg, str(tmp_path), plan_cells(cfg)[0].id)])


def test_missing_srun_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(ConfigError, match="--executor slurm.*srun"):
        SubmititBackend(SubmitOptions("slurm", timeout_min=5), tmp_path / "slurm", "x")


# ---------------------------------------------------------------------------- the driver, on a fake backend
class _Handle:
    def __init__(self, job_id: str, finish):
        self.job_id, self.ntasks, self._finish = job_id, 1, finish

    def done(self) -> bool:
        if self._finish is not None:
            self._finish()
            self._finish = None
        return True

    def cancel(self) -> None:
        pass


class _FakeBackend:
    """Jobs finish at the next poll: a good cell writes its JSON, a bad one a traceback in its log."""

    kind, poll_s, threads = "slurm", 0.0, None

    def __init__(self, cfg, out: Path, fail: set[str] = frozenset(), max_in_flight=None, earlier=None):
        self.cfg, self.out, self.fail, self.max_in_flight = cfg, out, fail, max_in_flight
        self.folder = out / "slurm"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.batches: list[list[str]] = []
        self.earlier = earlier or {}  # job id -> cell id of jobs "still running" from an earlier driver

    def _finish(self, cell_id: str, job_id: str):
        cell = next(c for c in plan_cells(self.cfg) if c.id == cell_id)

        def finish():
            if cell_id in self.fail:
                (self.folder / f"{job_id}_0_log.err").write_text(
                    "Traceback (most recent call last):\n  File ...\nRuntimeError: boom\n")
            else:
                cell.json_path(self.out).parent.mkdir(parents=True, exist_ok=True)
                cell.json_path(self.out).write_text(json.dumps(
                    {"cell": cell.id, "fingerprint": fingerprint(cell_config(self.cfg, cell))}))
        return finish

    def submit(self, calls):
        self.batches.append([c.cell_id for c in calls])
        n = sum(len(b) for b in self.batches)
        return [_Handle(f"{100 + n - len(calls) + i}", self._finish(c.cell_id, f"{100 + n - len(calls) + i}"))
                for i, c in enumerate(calls)]

    def reattach(self, entry):
        cell_id = self.earlier.get(entry["job_id"])
        return _Handle(entry["job_id"], self._finish(cell_id, entry["job_id"])) if cell_id else None

    def refresh(self):
        pass


def test_driver_submits_bases_first_and_dependents_once_their_base_is_done(tmp_path):
    cfg = parse_config(GRID)
    cells = plan_cells(cfg)
    backend = _FakeBackend(cfg, tmp_path)
    ran: list[str] = []
    res = run_submitted(cfg, tmp_path, cells, backend, ran=ran, quiet=True)
    assert sorted(ran) == sorted(c.id for c in cells) and res["cells_failed"] == [] == res["cells_not_run"]
    first, second = backend.batches  # one array each: what was ready at the same moment
    assert set(first) == {c.id for c in cells if c.stage == "pretrain"}
    assert first[:2] == ["fm/badnet/CLIP/seed0", "fm/blended/CLIP/seed0"]  # bases of other cells first
    assert set(second) == {"fm/badnet/CLIP+FT/seed0", "fm/blended/CLIP+FT/seed0"}
    ledger = json.loads((tmp_path / "slurm" / LEDGER).read_text())["jobs"]
    assert set(ledger) == set(ran) and ledger["fm/badnet/CLIP+FT/seed0"]["fingerprint"]


def test_a_failed_cell_is_reported_and_only_its_dependents_wait(tmp_path):
    cfg = parse_config(GRID)
    cells = plan_cells(cfg)
    backend = _FakeBackend(cfg, tmp_path, fail={"fm/badnet/CLIP/seed0"}, max_in_flight=2)
    ran: list[str] = []
    res = run_submitted(cfg, tmp_path, cells, backend, ran=ran, quiet=True)
    (failed,) = res["cells_failed"]
    assert failed["cell"] == "fm/badnet/CLIP/seed0" and failed["error"] == "RuntimeError: boom"
    assert failed["log"] == str(tmp_path / "slurm" / f"{failed['job_id']}_0_log.err")
    assert res["cells_not_run"] == [{"cell": "fm/badnet/CLIP+FT/seed0", "base": "fm/badnet/CLIP/seed0",
                                     "error": "not run: its base fm/badnet/CLIP/seed0 failed"}]
    assert sorted(ran) == sorted(c.id for c in cells if "badnet/CLIP" not in c.id)
    assert all(len(b) <= 2 for b in backend.batches)  # --slurm-array-parallelism


def test_a_rerun_waits_for_the_jobs_of_an_earlier_driver(tmp_path):
    cfg = parse_config(GRID)
    cells = plan_cells(cfg)
    base = cells[0]
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / LEDGER).write_text(json.dumps({"jobs": {base.id: {
        "job_id": "77", "executor": "slurm", "tasks": 1, "fingerprint": fingerprint(cell_config(cfg, base))}}}))
    backend = _FakeBackend(cfg, tmp_path, earlier={"77": base.id})
    res = run_submitted(cfg, tmp_path, cells, backend, quiet=True)
    assert res["cells_reattached"] == 1 and res["cells_submitted"] == len(cells) - 1
    assert base.id not in [c for b in backend.batches for c in b]
    assert is_done(cfg, base, tmp_path)


def test_local_jobs_of_an_earlier_driver_are_found_by_pid(tmp_path):
    """A driver killed with SIGKILL leaves its local jobs running; a rerun finds them by pid (and
    does not mistake a reused pid of another program for one)."""
    pytest.importorskip("submitit")
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    backend = SubmititBackend(SubmitOptions("local"), tmp_path / "slurm", "x")
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit.local._local"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        h = backend.reattach({"executor": "local", "job_id": str(job.pid), "tasks": 1})
        assert h is not None and not h.done()
        assert backend.reattach({"executor": "local", "job_id": str(other.pid), "tasks": 1}) is None
        assert backend.reattach({"executor": "slurm", "job_id": str(job.pid), "tasks": 1}) is None
        job.kill()
        job.wait()
        assert h.done()
    finally:
        for p in (job, other):
            p.kill()
            p.wait()


def test_error_line_reads_tracebacks_and_slurm_errors(tmp_path):
    a, b = tmp_path / "a.err", tmp_path / "b.err"
    a.write_text("INFO x\nslurmstepd: error: *** JOB 12 ON n1 CANCELLED AT 2025 DUE TO TIME LIMIT ***\n")
    assert error_line([a]) == ("slurmstepd: error: *** JOB 12 ON n1 CANCELLED AT 2025 DUE TO TIME LIMIT ***", a)
    b.write_text("Traceback (most recent call last):\n  x\nclipguard.errors.ConfigError: bad\nINFO done\n")
    assert error_line([a, b]) == ("clipguard.errors.ConfigError: bad", b)
    assert error_line([tmp_path / "missing"])[1] is None


# ---------------------------------------------------------------------------- end to end (local processes)
def _comparable(path: Path, out: Path) -> dict:
    """A cell's JSON without its timings, with its bench folder's paths written OUT."""
    rec = json.loads(path.read_text().replace(str(out), "OUT"))
    timing = {"seconds", "images_per_s", "hook_seconds"}
    rec["epochs"] = [{k: v for k, v in e.items() if k not in timing} for e in rec["epochs"]]
    return {k: v for k, v in rec.items() if k != "timings"}


@pytest.mark.slow
def test_local_executor_gives_the_default_executors_cells_and_a_rerun_submits_nothing(fm_dir, tmp_path):
    pytest.importorskip("submitit")
    from clipguard.bench.config import load_config
    from clipguard.bench.runner import run_bench

    config = _grid(fm_dir, tmp_path)
    overrides = ["attacks.tdpa=null"]  # badnet: a pre-training cell and the fine-tuning cell on its model
    cfg = load_config(config, overrides)
    pool_out, local_out = tmp_path / "pool", tmp_path / "local"
    before = torch.get_num_threads()
    torch.set_num_threads(SubmitOptions("local").threads)  # what a local job uses: the same sums
    try:
        run_bench(cfg, pool_out, quiet=True, report=False, only="badnet")
    finally:
        torch.set_num_threads(before)

    args = ["bench", str(config), "--out", str(local_out), "--set", overrides[0], "--only", "badnet",
            "--executor", "local", "--quiet"]
    assert main(args) == 0
    names = sorted(p.name for p in (pool_out / "cells").glob("*.json"))
    assert names == sorted(p.name for p in (local_out / "cells").glob("*.json")) and len(names) == 2
    for name in names:  # the same numbers, to the last digit
        local = _comparable(local_out / "cells" / name, local_out)
        assert local == _comparable(pool_out / "cells" / name, pool_out), name
        assert local["metrics"]["zeroshot_top1"] > 0
    meta = json.loads((local_out / "bench.json").read_text())
    assert (meta["executor"], meta["cells_submitted"], meta["cells_run"], meta["cells_failed"]) == ("local", 2, 2, [])
    jobs = json.loads((local_out / "slurm" / LEDGER).read_text())["jobs"]
    assert sorted(jobs) == ["fm/badnet/CLIP+FT/seed0", "fm/badnet/CLIP/seed0"]
    assert all(Path(j["log"]).is_file() for j in jobs.values())  # each job's log under OUT/slurm
    assert (local_out / "report.md").is_file()

    files = sorted(p.name for p in (local_out / "slurm").iterdir())
    assert main(args) == 0  # the same command again: everything is reused
    meta = json.loads((local_out / "bench.json").read_text())
    assert (meta["cells_submitted"], meta["cells_run"], meta["cells_skipped"]) == (0, 0, 2)
    assert sorted(p.name for p in (local_out / "slurm").iterdir()) == files


@pytest.mark.slow
def test_a_failing_cell_reports_its_log_and_a_two_task_cell_still_finishes(fm_dir, tmp_path, capsys):
    """Two cells at once (--jobs 2), each a job of two processes (a DDP run over gloo): one fails,
    the other finishes, trained on both ranks. (A failed cell's dependents: the fake-backend test.)"""
    pytest.importorskip("submitit")
    config = _grid(fm_dir, tmp_path)
    out = tmp_path / "bench"
    # a run folder left by another config: the cell's job refuses to train over it
    bad = out / "runs" / "fm" / "tdpa" / "seed0" / "pretrain-CLIP"
    bad.mkdir(parents=True)
    (bad / "bench_cell.json").write_text(json.dumps({"fingerprint": "0000"}))
    rc = main(["bench", str(config), "--out", str(out), "--set", "finetune=null", "--executor", "local",
               "--jobs", "2", "--slurm-tasks-per-node", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    meta = json.loads((out / "bench.json").read_text())
    (failed,) = meta["cells_failed"]
    assert failed["cell"] == "fm/tdpa/CLIP/seed0" and "holds a run of a different config" in failed["error"]
    log = Path(failed["log"])
    assert log.parent == out / "slurm" and "Traceback" in log.read_text()
    assert f"log: {log}" in err and "FAILED fm/tdpa/CLIP/seed0" in err
    assert [p.name for p in (out / "cells").glob("*.json")] == ["fm__badnet__CLIP__seed0.json"]
    params = json.loads((out / "runs" / "fm" / "badnet" / "seed0" / "pretrain-CLIP" / "params.json").read_text())
    assert params["world_size"] == 2
