"""``clipguard models``: list model names (our tiny configs, then open_clip's)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list model architectures")
    p.add_argument("--all", action="store_true",
                   help="also list open_clip architectures that need a download (clipguard refuses them)")
    p.set_defaults(func=run)


def run(args) -> int:
    from clipguard.models.factory import MODELS, list_models, needs_download

    for name in list_models(include_download=getattr(args, "all", False)):
        if name in MODELS:
            note = "  (clipguard tiny config)"
        else:
            why = needs_download(name) if getattr(args, "all", False) else None
            note = f"  (not usable: {why})" if why else ""
        print(f"{name}{note}")
    return 0
