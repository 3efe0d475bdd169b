"""``clipguard data fashion-mnist --out DIR``: materialise the embedded default dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="materialise a built-in dataset as an open_clip-style CSV")
    dsub = p.add_subparsers(dest="dataset", required=True)
    f = dsub.add_parser("fashion-mnist", help="Debian's Fashion-MNIST with seeded, varied captions")
    f.add_argument("--out", required=True)
    f.add_argument("--train-size", type=int, default=None, help="stratified subset (default: all 60k)")
    f.add_argument("--test-size", type=int, default=None, help="stratified subset (default: all 10k)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that is not this command's output with the same "
                        "arguments (only the files this command writes are replaced)")
    f.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard.data.fashion_mnist import materialise, materialise_args, read_stamp
    from clipguard.errors import ConfigError

    out = Path(args.out)
    wanted = materialise_args(args.train_size, args.test_size, args.seed)
    stamp = read_stamp(out) if out.is_dir() else None
    made_with = {k: stamp.get(k) for k in wanted} if stamp else None
    if made_with == wanted and all((out / f).is_file() for f in stamp["files"]):
        print(f"{out} already holds this dataset (same arguments); nothing to do")
        return 0
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        what = f"Fashion-MNIST made with {made_with}" if made_with else "files this command did not write"
        raise ConfigError(f"{out} is not empty: it holds {what}; pass --overwrite to replace this "
                          "command's files there (others are kept), or choose another --out")
    out = materialise(out, train_size=args.train_size, test_size=args.test_size, seed=args.seed,
                      overwrite=args.overwrite)
    print(f"wrote {out}/train.csv, {out}/test.csv, {out}/classes.json")
    return 0
