"""The ``clipguard`` command: a thin dispatcher; each sub-command lives in clipguard/commands/."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from clipguard import __version__
from clipguard.errors import ClipguardError

COMMANDS = ["data", "models", "train", "evaluate", "poison", "finetune", "subcaptions", "bench", "demo"]


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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("root").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClipguardError as e:
        print(f"clipguard {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"clipguard {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
