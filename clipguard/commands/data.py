"""``clipguard data NAME --out DIR``: materialise a built-in dataset (fashion-mnist, mnist)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from clipguard.data import builtin

    p = sub.add_parser("data", help="materialise a built-in dataset as an open_clip-style CSV")
    dsub = p.add_subparsers(dest="dataset", required=True)
    for name in builtin.names():
        ds = builtin.get(name)
        f = dsub.add_parser(name, help=ds.summary or ds.title)
        f.add_argument("--out", required=True)
        f.add_argument("--train-size", type=int, default=None, help="stratified subset (default: all 60k)")
        f.add_argument("--test-size", type=int, default=None, help="stratified subset (default: all 10k)")
        f.add_argument("--seed", type=int, default=0)
        f.add_argument("--root", default=None, help=f"folder with the idx files (default: {ds.root()})")
        if ds.fetch is not None:
            f.add_argument("--fetch", action="store_true", help="fetch the idx files into --root first if absent")
        f.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty --out that is not this command's output with the same "
                            "arguments (only the files this command writes are replaced)")
        f.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard.data import builtin
    from clipguard.errors import ConfigError

    ds = builtin.get(args.dataset)
    root = Path(args.root) if args.root else None
    if getattr(args, "fetch", False):
        print(f"{ds.title} files in {ds.fetch(root)}")
    out = Path(args.out)
    wanted = builtin.materialise_args(ds, args.train_size, args.test_size, args.seed)
    stamp = builtin.read_stamp(out) if out.is_dir() else None
    made_with = {k: stamp.get(k) for k in wanted} if stamp else None
    if made_with == wanted and all((out / f).is_file() for f in stamp["files"]):
        print(f"{out} already holds this dataset (same arguments); nothing to do")
        return 0
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        what = f"a dataset made with {made_with}" if made_with else "files this command did not write"
        raise ConfigError(f"{out} is not empty: it holds {what}; pass --overwrite to replace this "
                          "command's files there (others are kept), or choose another --out")
    out = builtin.materialise(ds, out, train_size=args.train_size, test_size=args.test_size, seed=args.seed,
                              root=root, overwrite=args.overwrite)
    print(f"wrote {out}/train.csv, {out}/test.csv, {out}/classes.json")
    return 0
