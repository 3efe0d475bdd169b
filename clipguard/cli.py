"""The ``clipguard`` command: a thin dispatcher; each sub-command lives in clipguard/commands/."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from clipguard import __version__
from clipguard.errors import ClipguardError

COMMANDS = ["data", "models", "train", "evaluate", "poison", "finetune", "subcaptions", "bench", "demo",
            "scan"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipguard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"clipguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"clipguard.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"clipguard.commands.{name}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return parser


def _os_error(e: OSError) -> str:
    """One line for an OSError: '<file>: <reason>' (permissions, a directory in the way, a full disk)."""
    reason = e.strerror or str(e)
    where = ", ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return (f"{where}: {reason}" if where else reason).replace("\n", " ")


def _quiet_stdout() -> None:
    """Send what is left of stdout to /dev/null: its reader is gone (``| head``), so that the
    interpreter's final flush does not print a second BrokenPipeError, or this process is not the
    rank that speaks."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _quiet_other_ranks() -> None:
    """Under torchrun every rank runs the same command: rank 0 prints the results and the warnings,
    the other ranks only their errors (stderr), so a run's output is not repeated once per process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or int(os.environ.get("RANK", "0") or 0) == 0:
        return
    logging.getLogger("clipguard").setLevel(logging.ERROR)
    _quiet_stdout()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("root").setLevel(logging.ERROR)  # open_clip's "no pretrained weights" and the like
    logging.getLogger("clipguard").setLevel(logging.WARNING)  # our own warnings stay visible
    _quiet_other_ranks()
    args = build_parser().parse_args(argv)
    prog = f"clipguard {args.command}"
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at exit
        return rc
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell tool killed by the closed pipe
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except ClipguardError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a directory or file in the way, a full disk, a missing file
        print(f"{prog}: error: {_os_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
