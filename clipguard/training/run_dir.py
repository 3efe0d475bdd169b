"""A run folder's safety rules: never replace a finished run by accident, one writer at a time.

A run folder holds what the trainer writes (``RUN_ENTRIES``). Starting a run where one already
finished needs ``resume`` (continue it) or ``overwrite`` (delete exactly those entries and
nothing else the user keeps there). A lock file stops two trainings from interleaving in one
folder; a lock left by a killed process (its pid is gone) is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType

from clipguard.errors import ConfigError

LOCK_FILE = ".clipguard.lock"
LOG_FILE = "out.log"
# what a training run writes into its folder; --overwrite removes these and nothing else
RUN_ENTRIES = ("checkpoints", "results.jsonl", "params.json", LOG_FILE, "tensorboard")
RUN_GLOBS = ("similarity_hist_epoch*.png",)


def has_run(out: Path) -> bool:
    """True when ``out`` holds a started or finished run."""
    return any((out / name).exists() for name in ("checkpoints", "results.jsonl", "params.json"))


def check_out_path(out: Path) -> None:
    """The folder must be a folder we can create and write (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable")


def prepare(out: Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse to start over a run unless told how; with ``overwrite`` remove only what a run wrote."""
    if not has_run(out):
        return
    if overwrite:
        for name in RUN_ENTRIES:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        for pattern in RUN_GLOBS:
            for p in out.glob(pattern):
                p.unlink()
        return
    if resume is None:
        raise ConfigError(f"--out {out}: already holds a run; pass --resume latest to continue it, "
                          f"or --overwrite to replace it (or choose another --out)")


class RunLock:
    """An exclusive lock file in the run folder, released on exit (also on errors)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def __enter__(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    owner = self._owner()
                    raise ConfigError(f"{self.path.parent}: another run is writing this folder (pid "
                                      f"{owner.get('pid')} on {owner.get('host')}); wait for it, or use "
                                      f"another --out. If no such process exists, delete {self.path}") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"{self.path}: could not take the run lock")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self) -> bool:
        """A lock whose process is gone (same host) or that cannot be read is stale."""
        owner = self._owner()
        pid = owner.get("pid")
        if not isinstance(pid, int) or owner.get("host") != socket.gethostname():
            return not isinstance(pid, int)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class RunLog:
    """``out.log``: one line per event (start, resume, each epoch, finish, failure), appended."""

    def __init__(self, out: Path, enabled: bool = True):
        self.path = Path(out) / LOG_FILE
        self.enabled = enabled

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")
