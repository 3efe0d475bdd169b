"""Cells as submitit jobs: ``clipguard bench --executor slurm`` (a SLURM cluster) or ``--executor
local`` (processes on this machine, through submitit's LocalExecutor).

The ``clipguard bench`` process is the *driver*. It prepares the shared data as always (datasets,
poisoned sets), then submits every cell that is ready as one job (the cells ready at the same
moment go in one job array), polls the jobs, submits the cells whose base has just finished (the
order and the waiting are clipguard/bench/schedule.py's, as for ``--jobs``), and writes the
report at the end. A job trains (or resumes) and evaluates its cell and writes the cell's JSON,
exactly as a ``--jobs`` worker does; the driver reads that JSON to know the cell finished, never a
job's result pickle.

Resuming: a finished cell (its JSON, same fingerprint) is never submitted again. Every submission
is recorded in ``OUT/slurm/jobs.json``; a rerun of the same command finds the jobs of an earlier
driver that are still queued or running and waits for them instead of submitting their cells a
second time. A cell whose job ended without its JSON (failed, cancelled, timed out too often) is
submitted again and resumes from its last epoch checkpoint.

One cell can span several processes (``--slurm-nodes K --slurm-gpus-per-node G``: K x G tasks, one
per GPU): each task gets the torch.distributed variables that torchrun would set (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) from submitit's job environment, and
the trainer's DDP path (clipguard/training/distributed.py) takes it from there.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipguard.bench.config import BenchConfig
from clipguard.bench.plan import Cell
from clipguard.errors import ConfigError

INSTALL_HINT = "pip install 'clipguard[slurm]' (or pip install submitit)"
EXECUTORS = ("local", "slurm")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's LocalExecutor kills a job after 2 minutes unless told otherwise
LEDGER = "jobs.json"


def import_submitit():
    """submitit, or a ConfigError that says which extra to install."""
    try:
        import submitit
    except ImportError as e:
        raise ConfigError(f"--executor slurm/local needs the submitit package, which is not installed: "
                          f"{INSTALL_HINT}") from e
    return submitit


def parse_mem_gb(text: str | float | int) -> float:
    """Memory per node in GB: '64', '64G', '64GB', '500M', '1.5T'."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
        if m is None:
            raise ConfigError(f"--slurm-mem: '{text}' is not a memory size (e.g. 64, 64G, 500M)")
        scale = {"": 1.0, "k": 1 / 1024**2, "m": 1 / 1024, "g": 1.0, "t": 1024.0}[m.group(2).lower()]
        value = float(m.group(1)) * scale
    if value <= 0:
        raise ConfigError(f"--slurm-mem must be > 0, got {text}")
    return value


def parse_additional(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings as extra ``#SBATCH --KEY=VALUE`` lines; a bare ``KEY`` is a flag."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"--slurm-additional: '{item}' is not KEY=VALUE (e.g. account=proj, qos=high)")
        out[key] = value if sep else True
    return out


@dataclass
class SubmitOptions:
    """How cells become jobs. The names follow submitit's AutoExecutor (``timeout_min``, ``nodes``,
    ``gpus_per_node``, ``tasks_per_node``, ``cpus_per_task``, ``mem_gb``) and its SLURM-only
    parameters (``slurm_partition``, ``slurm_array_parallelism``, ``slurm_additional_parameters``,
    ``slurm_setup``)."""

    executor: str  # "slurm" | "local"
    timeout_min: int | None = None  # slurm: required; local: a week
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # None: one per GPU (at least one)
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None  # slurm: jobs queued or running at once (None: no limit)
    additional: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    jobs: int = 1  # local: jobs running at once
    poll_s: float | None = None  # None: 1 s locally, 30 s on SLURM

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else max(1, self.gpus_per_node)

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def max_in_flight(self) -> int | None:
        return self.jobs if self.executor == "local" else self.array_parallelism

    @property
    def threads(self) -> int | None:
        """Torch threads of a task: local, this machine's cores shared by the jobs and their tasks;
        SLURM, None (the CPUs SLURM gave the task)."""
        if self.executor != "local":
            return None
        return max(1, (os.cpu_count() or 1) // (self.jobs * self.ntasks_per_node))

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of pool, {', '.join(EXECUTORS)}; got {self.executor!r}")
        if self.executor == "slurm" and self.timeout_min is None:
            raise ConfigError("--executor slurm needs --slurm-time MINUTES (each cell's time limit; without it "
                              "submitit would ask SLURM for 5 minutes)")
        checks = {"--slurm-time": (self.timeout_min, 1), "--slurm-nodes": (self.nodes, 1),
                  "--slurm-gpus-per-node": (self.gpus_per_node, 0), "--slurm-tasks-per-node": (self.tasks_per_node, 1),
                  "--slurm-cpus-per-task": (self.cpus_per_task, 1),
                  "--slurm-array-parallelism": (self.array_parallelism, 1), "--jobs": (self.jobs, 1)}
        for flag, (value, least) in checks.items():
            if value is not None and value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ConfigError(f"--slurm-mem must be > 0, got {self.mem_gb}")
        if self.executor == "local":
            if self.nodes != 1:
                raise ConfigError("--executor local runs on this machine only: --slurm-nodes must be 1")
            slurm_only = {"--slurm-partition": self.partition, "--slurm-array-parallelism": self.array_parallelism,
                          "--slurm-additional": self.additional, "--slurm-setup": self.setup}
            given = [flag for flag, v in slurm_only.items() if v]
            if given:
                raise ConfigError(f"{', '.join(given)}: only for --executor slurm")
        elif self.jobs != 1:
            raise ConfigError("--jobs is for the local worker pool and --executor local; on SLURM, "
                              "--slurm-array-parallelism limits the cells queued or running at once")

    def parameters(self, name: str) -> dict[str, Any]:
        """Keyword arguments of ``AutoExecutor.update_parameters``."""
        params: dict[str, Any] = {
            "name": name, "timeout_min": self.timeout_min if self.timeout_min is not None else LOCAL_TIMEOUT_MIN,
            "nodes": self.nodes, "tasks_per_node": self.ntasks_per_node,
            # SLURM: no --gpus-per-node line for CPU jobs; local: 0 GPUs means CUDA_VISIBLE_DEVICES=""
            "gpus_per_node": self.gpus_per_node if self.gpus_per_node or self.executor == "local" else None,
            "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
        }
        if self.executor == "slurm":
            params.update(slurm_partition=self.partition, slurm_array_parallelism=self.array_parallelism,
                          slurm_additional_parameters=dict(self.additional) or None,
                          slurm_setup=list(self.setup) or None,
                          # a rank that dies ends the job at once, instead of its peers waiting in a
                          # collective until NCCL's or gloo's timeout
                          slurm_srun_args=["--kill-on-bad-exit=1"] if self.ntasks > 1 else None)
        return {k: v for k, v in params.items() if v is not None}

    def record(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- inside a job
def distributed_env() -> dict[str, str]:
    """The torch.distributed variables of this task, as torchrun would set them, from submitit's
    view of the job (SLURM's SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, ...;
    or the LocalExecutor's equivalents). MASTER_ADDR is the job's first node, MASTER_PORT a port
    derived from the job id (the same on every task). CUDA_VISIBLE_DEVICES is left alone: a task
    sees its node's GPUs and uses ``cuda:LOCAL_RANK``, as under torchrun."""
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    job = submitit.JobEnvironment()
    addr = "127.0.0.1" if job.cluster == "local" else env.master_addr  # local: every task is on this machine
    return {"MASTER_ADDR": str(addr), "MASTER_PORT": str(env.master_port), "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size)}


def _check_gpus(device: str, env: dict[str, str]) -> None:
    """A task uses cuda:LOCAL_RANK; refuse clearly when SLURM bound fewer GPUs to it."""
    import torch

    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return
    local, n = int(env.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= n:
        raise ConfigError(f"task with LOCAL_RANK {local} sees {n} GPU(s) (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); every task must see all of its node's "
                          f"GPUs (SLURM binds one per task with --gpus-per-task or --gpu-bind: leave those out)")


class CellJob:
    """What one job runs: one cell, on every task of the job. A callable with a ``checkpoint``
    method, so submitit requeues it when SLURM preempts it or its time runs out (at most 3 times
    for time-outs); the requeued job resumes from the cell's last epoch checkpoint."""

    def __init__(self, cfg: BenchConfig, out: str, cell_id: str, threads: int | None = None, quiet: bool = True):
        self.cfg, self.out, self.cell_id, self.threads, self.quiet = cfg, str(out), cell_id, threads, quiet

    def __call__(self) -> dict[str, Any]:
        import torch

        from clipguard.bench.cache import BenchCache
        from clipguard.bench.cell import is_done, run_cell
        from clipguard.bench.plan import plan_cells
        from clipguard.training.distributed import barrier, cleanup, init_distributed

        env = distributed_env()
        os.environ.update(env)
        threads = self.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
        if threads:
            torch.set_num_threads(threads)
        cfg, out = self.cfg, Path(self.out)
        cell = next((c for c in plan_cells(cfg) if c.id == self.cell_id), None)
        if cell is None:
            raise ConfigError(f"{cfg.source}: no cell {self.cell_id} in this grid")
        if is_done(cfg, cell, out):  # submitted twice (e.g. by two drivers): nothing left to do
            return {"cell": cell.id, "rank": int(env["RANK"]), "skipped": True}
        _check_gpus(cfg.device, env)
        dist = init_distributed(cfg.device)
        try:
            run_cell(cfg, cell, out, BenchCache(cfg, out), quiet=self.quiet, evaluate=dist.is_main)
            barrier(dist)
        finally:
            cleanup(dist)
        return {"cell": cell.id, "rank": dist.rank, "skipped": False}

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------- the driver's side
def log_paths(folder: Path, job_id: str, ntasks: int) -> list[Path]:
    """Each task's stderr log (then stdout), as submitit names them: FOLDER/<job>_<task>_log.err."""
    from submitit.core.utils import JobPaths

    paths = [JobPaths(folder, job_id=job_id, task_id=t) for t in range(ntasks)]
    return [p.stderr for p in paths] + [p.stdout for p in paths]


def error_line(logs: list[Path]) -> tuple[str, Path | None]:
    """Why a job failed, in one line, and the log that says so: the exception of the first log
    with a Python traceback, else the last line that mentions an error (SLURM's 'slurmstepd:
    error: ... CANCELLED ... DUE TO TIME LIMIT', an out-of-memory kill)."""
    texts = []
    for path in logs:
        try:
            texts.append((path, [ln.rstrip() for ln in path.read_text(errors="replace").splitlines()]))
        except OSError:
            continue
    for path, lines in texts:
        if any(ln.startswith("Traceback") for ln in lines):
            errors = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
            return (errors[-1] if errors else next((ln for ln in reversed(lines) if ln.strip()), "")), path
    for path, lines in texts:
        errors = [ln.strip() for ln in lines if re.search(r"error|cancelled|killed|oom", ln, re.IGNORECASE)]
        if errors:
            return errors[-1], path
    return ("the job ended without finishing the cell and without an error in its logs (killed? out of "
            "memory or time?)", texts[0][0] if texts else None)


class _JobHandle:
    """A job submitted by this driver."""

    def __init__(self, job, folder: Path, ntasks: int):
        self.job, self.job_id, self.folder, self.ntasks = job, str(job.job_id), folder, ntasks
        self.reattached = False

    def done(self) -> bool:
        return bool(self.job.done())

    def cancel(self) -> None:
        self.job.cancel(check=False)


class _LocalPidHandle:
    """A local job of an earlier driver: its controller process, found by pid."""

    def __init__(self, job_id: str, folder: Path, ntasks: int):
        self.job_id, self.folder, self.ntasks, self.reattached = job_id, folder, ntasks, True

    def done(self) -> bool:
        return not _submitit_process_alive(int(self.job_id))

    def cancel(self) -> None:
        import signal

        try:
            os.kill(int(self.job_id), signal.SIGINT)
        except OSError:
            pass


def _submitit_process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the pid was reused
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            if "\nState:\tZ" in (proc / "status").read_text():
                return False
            return b"submitit" in (proc / "cmdline").read_bytes()  # not a reused pid
        except OSError:
            return False
    return True


class SubmititBackend:
    """submitit's AutoExecutor for ``slurm`` or ``local``, with its job folder ``OUT/slurm``."""

    def __init__(self, opts: SubmitOptions, folder: Path, name: str):
        self.submitit = import_submitit()
        self.opts, self.kind, self.folder = opts, opts.executor, Path(folder).absolute()
        self.poll_s = opts.poll_s if opts.poll_s is not None else (1.0 if self.kind == "local" else 30.0)
        self.threads, self.max_in_flight = opts.threads, opts.max_in_flight
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.executor = self.submitit.AutoExecutor(folder=self.folder, cluster=self.kind)
        except RuntimeError as e:  # SlurmExecutor: no srun here
            raise ConfigError(f"--executor slurm: {e} (run clipguard bench where sbatch and srun work, "
                              f"e.g. a login node; or use --executor local)") from e
        try:
            self.executor.update_parameters(**opts.parameters(name))
        except (ValueError, NameError, AssertionError) as e:
            raise ConfigError(f"--slurm-* options refused by submitit: {e}") from e
        self._last_refresh = time.monotonic()

    @classmethod
    def for_bench(cls, opts: SubmitOptions, cfg: BenchConfig, out: str | Path, world_size: int = 1):
        """The backend of a grid: job folder ``OUT/slurm``, jobs named ``clipguard-<grid name>``."""
        if world_size > 1:
            raise ConfigError(f"--executor {opts.executor} is not run under torchrun: each cell's job gets "
                              "its own processes (--slurm-nodes, --slurm-gpus-per-node, --slurm-tasks-per-node)")
        opts.validate()
        return cls(opts, Path(out) / "slurm", f"clipguard-{cfg.name}")

    def submit(self, calls: list[CellJob]) -> list[_JobHandle]:
        """One job per call; several calls are one job array on SLURM."""
        helpers = self.submitit.helpers
        env = {} if "TQDM_MININTERVAL" in os.environ else {"TQDM_MININTERVAL": "30"}  # bars in a log file
        # clean_env: a driver that itself runs in a SLURM job (or under torchrun) must not hand its
        # job's SLURM_* and RANK variables to the jobs it submits
        try:
            with helpers.clean_env(), helpers.environment_variables(**env):
                if len(calls) == 1:
                    jobs = [self.executor.submit(calls[0])]
                else:
                    with self.executor.batch():
                        jobs = [self.executor.submit(c) for c in calls]
        except (OSError, RuntimeError, ValueError) as e:  # sbatch refused (partition, account, limits)
            raise ConfigError(f"--executor {self.kind}: submitting {len(calls)} cell(s) failed: {e}") from e
        return [_JobHandle(j, self.folder, self.opts.ntasks) for j in jobs]

    def reattach(self, entry: dict[str, Any]):
        """The handle of a job an earlier driver submitted, or None when it is not queued or running."""
        if entry.get("executor") != self.kind:
            return None
        job_id, ntasks = str(entry["job_id"]), int(entry.get("tasks", 1))
        if self.kind == "local":
            h = _LocalPidHandle(job_id, self.folder, ntasks)
            return None if h.done() else h
        job = self.submitit.SlurmJob(folder=self.folder, job_id=job_id, tasks=list(range(ntasks)))
        try:
            state = job.get_info(mode="force").get("State") or "UNKNOWN"
        except Exception:  # sacct unavailable: treat the job as gone
            return None
        if state.upper() == "UNKNOWN" or job.done():
            return None
        h = _JobHandle(job, self.folder, ntasks)
        h.reattached = True
        return h

    def refresh(self) -> None:
        """SLURM: ask sacct about every job at least every 5 minutes (submitit's own pace is 10), so a
        job killed without a result (out of memory, cancelled) is noticed."""
        if self.kind == "slurm" and time.monotonic() - self._last_refresh > 300:
            self.submitit.SlurmJob.watcher.update()
            self._last_refresh = time.monotonic()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _say(text: str, quiet: bool, err: bool = False) -> None:
    from tqdm.auto import tqdm

    if err:
        tqdm.write(text, file=sys.stderr)
    elif not quiet:
        tqdm.write(text)


def run_submitted(cfg: BenchConfig, out: str | Path, cells: list[Cell], backend, *, bar=None,
                  ran: list[str] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run ``cells`` (unfinished, data prepared) as jobs of ``backend`` (a SubmititBackend, or
    anything with its attributes); return what happened, for bench.json: ``cells_submitted`` (jobs
    submitted by this call), ``cells_reattached`` (jobs of an earlier driver waited for),
    ``cells_failed`` (cell, job_id, log, error) and ``cells_not_run`` (cells whose base did not
    finish). Finished cells are appended to ``ran``.

    A failing cell does not stop the others; only the cells that need its model are not run."""
    from clipguard.bench.cell import cell_config, fingerprint, is_done, read_cell
    from clipguard.bench.runner import _summary
    from clipguard.bench.schedule import CellQueue
    from clipguard.io import write_json

    out = Path(out)
    ran = ran if ran is not None else []
    queue = CellQueue(cfg, out, cells)
    ledger_path = backend.folder / LEDGER
    ledger: dict[str, Any] = (read_cell(ledger_path) or {}).get("jobs", {}) if ledger_path.is_file() else {}
    fps = {c.id: fingerprint(cell_config(cfg, c)) for c in cells}
    running: dict[str, tuple[Cell, Any]] = {}
    failed: list[dict[str, Any]] = []
    failed_ids: set[str] = set()
    submitted = reattached = 0

    for c in list(queue.pending):  # jobs of an earlier driver that are still queued or running
        entry = ledger.get(c.id)
        if not entry or entry.get("fingerprint") != fps[c.id]:
            continue
        h = backend.reattach(entry)
        if h is not None:
            queue.remove(c)
            running[c.id] = (c, h)
            reattached += 1
            _say(f"[{c.id}] job {h.job_id} of an earlier run is still {'running' if backend.kind == 'local' else 'queued or running'}: waiting for it", quiet)

    def save_ledger() -> None:
        write_json(ledger_path, {"executor": backend.kind, "jobs": ledger})

    changed = True
    try:
        while True:
            if changed:
                room = None if backend.max_in_flight is None else backend.max_in_flight - len(running)
                batch = queue.take(room) if room is None or room > 0 else []
                if batch:
                    calls = [CellJob(cfg, str(out.absolute()), c.id, threads=backend.threads, quiet=quiet)
                             for c in batch]
                    handles = backend.submit(calls)
                    for c, h in zip(batch, handles):
                        running[c.id] = (c, h)
                        ledger[c.id] = {"job_id": h.job_id, "executor": backend.kind, "tasks": h.ntasks,
                                        "fingerprint": fps[c.id], "submitted": _now(),
                                        "log": str(log_paths(backend.folder, h.job_id, 1)[0])}
                    save_ledger()
                    submitted += len(batch)
                    ids = ", ".join(h.job_id for h in handles)
                    _say(f"submitted {len(batch)} cell(s) as {backend.kind} job(s) {ids} "
                         f"(logs: {backend.folder}/<job>_<task>_log.err|out)", quiet)
                changed = False
            if not running:
                break
            time.sleep(backend.poll_s)
            backend.refresh()
            for cid, (c, h) in list(running.items()):
                if not h.done():
                    continue
                del running[cid]
                changed = True
                if is_done(cfg, c, out):
                    ran.append(c.id)
                    if bar is not None:
                        bar.update(1)
                    rec = read_cell(c.json_path(out))
                    if rec is not None and not quiet:
                        try:
                            _say(_summary(rec), quiet)
                        except (KeyError, TypeError, ValueError):
                            _say(f"[{c.id}] done", quiet)
                    continue
                error, log = error_line(log_paths(backend.folder, h.job_id, h.ntasks))
                log = log or log_paths(backend.folder, h.job_id, 1)[0]
                failed.append({"cell": c.id, "job_id": h.job_id, "log": str(log), "error": error})
                failed_ids.add(c.id)
                _say(f"[{c.id}] FAILED in job {h.job_id}: {error}\n    log: {log}", quiet, err=True)
    except BaseException:
        left = [h for _, h in running.values()]
        if backend.kind == "local":  # local jobs stop with their driver (Ctrl-C)
            for h in left:
                h.cancel()
        elif left:
            ids = " ".join(h.job_id for h in left)
            _say(f"{len(left)} job(s) left queued or running on the cluster: rerun the same command to wait "
                 f"for them (and submit the rest), or cancel them: scancel {ids}", quiet, err=True)
        raise

    not_run = []
    for c in queue.pending:
        base = queue.base(c)
        why = "failed" if base is not None and base.id in failed_ids else "did not finish"
        not_run.append({"cell": c.id, "base": base.id if base else None,
                        "error": f"not run: its base {base.id if base else '?'} {why}"})
        _say(f"[{c.id}] not run: its base {base.id if base else '?'} {why}", quiet, err=True)
    return {"cells_submitted": submitted, "cells_reattached": reattached, "cells_failed": failed,
            "cells_not_run": not_run}
