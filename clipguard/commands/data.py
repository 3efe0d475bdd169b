"""``clipguard data fashion-mnist --out DIR``: materialise the embedded default dataset."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="materialise a built-in dataset as an open_clip-style CSV")
    dsub = p.add_subparsers(dest="dataset", required=True)
    f = dsub.add_parser("fashion-mnist", help="Debian's Fashion-MNIST with seeded, varied captions")
    f.add_argument("--out", required=True)
    f.add_argument("--train-size", type=int, default=None, help="stratified subset (default: all 60k)")
    f.add_argument("--test-size", type=int, default=None, help="stratified subset (default: all 10k)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard.data.fashion_mnist import materialise

    out = materialise(args.out, train_size=args.train_size, test_size=args.test_size, seed=args.seed)
    print(f"wrote {out}/train.csv, {out}/test.csv, {out}/classes.json")
    return 0
