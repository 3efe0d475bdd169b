"""``clipguard subcaptions``: show the factual / counterfactual sub-captions CleanerCLIP uses."""

from __future__ import annotations

import argparse
import json
import random


def add_parser(sub) -> None:
    p = sub.add_parser("subcaptions", help="print factual and counterfactual sub-captions of captions")
    p.add_argument("--caption", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--data", default=None, help="a CSV: use its captions (with --limit)")
    p.add_argument("--limit", type=int, default=10, help="captions to take from --data")
    p.add_argument("--n", type=int, default=3, help="counterfactuals per caption")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slots", default="adj,verb,noun", help="slot kinds to replace (comma list)")
    p.add_argument("--json", action="store_true", help="one JSON object per caption")
    p.add_argument("--summary", action="store_true",
                   help="instead of each caption: how many have a factual, how many distinct factuals, the "
                        "commonest ones (a check that the factuals keep what your captions are about)")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-separator", default="\t")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard.data.subcaptions import SubcaptionGenerator
    from clipguard.errors import ConfigError

    captions = list(args.caption)
    if args.data:
        from clipguard.data.csv_dataset import CsvSpec, read_rows

        sep = args.csv_separator.encode().decode("unicode_escape") if "\\" in args.csv_separator \
            else args.csv_separator
        spec = CsvSpec(img_key=args.csv_img_key, caption_key=args.csv_caption_key, separator=sep)
        _, rows = read_rows(args.data, spec)
        captions += [row[args.csv_caption_key] or "" for row in rows[: args.limit]]
    if not captions:
        raise ConfigError("give --caption TEXT (repeatable) or --data CSV")
    try:
        gen = SubcaptionGenerator(kinds=tuple(k.strip() for k in args.slots.split(",") if k.strip()))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.summary:
        _summary(gen, captions, args.json)
        return 0
    rng = random.Random(args.seed)
    for cap in captions:
        fact = gen.factual(cap)
        counters = [gen.counterfactual(fact, rng) for _ in range(args.n)] if fact else []
        if args.json:
            print(json.dumps({"caption": cap, "factual": fact.text if fact else None,
                              "counterfactual": [c.text for c in counters if c is not None]}))
            continue
        print(f"caption:        {cap}")
        print(f"factual:        {fact.text if fact else '(no noun found: not used)'}")
        for c in counters:
            if c is not None:
                print(f"counterfactual: {c.text}")
        print()
    return 0


def _summary(gen, captions: list[str], as_json: bool, top: int = 10) -> None:
    """What the factual term will see: its sub-captions should carry what tells the pairs apart
    (a class, an object); a few generic phrases for many captions mean it trains on nothing."""
    from collections import Counter

    facts = [gen.factual(c) for c in captions]
    counts = Counter(f.text for f in facts if f is not None)
    parsed = sum(counts.values())
    out = {"captions": len(captions), "distinct_captions": len(set(captions)), "with_factual": parsed,
           "no_noun": len(captions) - parsed, "distinct_factuals": len(counts),
           "commonest": [{"factual": t, "count": n, "share": round(n / parsed, 4)}
                         for t, n in counts.most_common(top)]}
    if as_json:
        print(json.dumps(out))
        return
    print(f"captions:          {out['captions']} ({out['distinct_captions']} distinct)")
    print(f"with a factual:    {parsed} (no noun found in {out['no_noun']}: those take part in CLIP and in-modal only)")
    print(f"distinct factuals: {out['distinct_factuals']}")
    print("commonest factuals:")
    for c in out["commonest"]:
        print(f"  {c['count']:>7}  {100 * c['share']:5.1f}%  {c['factual']}")
