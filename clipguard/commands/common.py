"""Options shared by several sub-commands (CSV conventions, devices, seeds)."""

from __future__ import annotations

import argparse

from clipguard.data.csv_dataset import (
    DEFAULT_CAPTION_KEY,
    DEFAULT_IMG_KEY,
    DEFAULT_LABEL_KEY,
    DEFAULT_SEPARATOR,
    CsvSpec,
)


def add_csv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CSV (open_clip conventions)")
    g.add_argument("--csv-img-key", default=DEFAULT_IMG_KEY)
    g.add_argument("--csv-caption-key", default=DEFAULT_CAPTION_KEY)
    g.add_argument("--csv-label-key", default=DEFAULT_LABEL_KEY)
    g.add_argument("--csv-separator", default=DEFAULT_SEPARATOR,
                   help="column separator (default: tab, as open_clip)")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows with a missing/corrupt image or empty caption, and report how many")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="accept image paths that resolve outside the CSV's folder (../, absolute, "
                        "symlinks); refused by default")


def csv_spec(args: argparse.Namespace) -> CsvSpec:
    sep = args.csv_separator.encode().decode("unicode_escape") if "\\" in args.csv_separator else args.csv_separator
    return CsvSpec(img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                   label_key=args.csv_label_key or None, separator=sep,
                   allow_outside_root=bool(getattr(args, "allow_outside_root", False)))
