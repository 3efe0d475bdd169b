"""``clipguard models``: list model names (our tiny configs, then open_clip's)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list model architectures")
    p.set_defaults(func=run)


def run(args) -> int:
    from clipguard.models.factory import MODELS, list_models

    for name in list_models():
        print(f"{name}{'  (clipguard tiny config)' if name in MODELS else ''}")
    return 0
