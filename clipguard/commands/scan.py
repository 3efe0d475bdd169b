"""``clipguard scan``: score every pair of a dataset with poison detectors; write what to keep."""

from __future__ import annotations

import argparse

from clipguard.commands.common import add_csv_args, csv_spec


def add_parser(sub) -> None:
    p = sub.add_parser("scan", help="find suspicious (poisoned) pairs in a dataset with a model's embeddings",
                       description="Encode the dataset once with the model, score every pair with each "
                                   "detector (higher: more suspicious), and write DIR/scores.csv, "
                                   "DIR/kept.csv, DIR/suspicious.csv and DIR/scan.json (with "
                                   "--attack-manifest also detection metrics and plots).")
    p.add_argument("--data", required=True, help="dataset: CSV, or webdataset shards")
    p.add_argument("--checkpoint", required=True, action="append",
                   help="run folder, checkpoint folder or .safetensors; repeat it to score with several "
                        "models (each detector's score is then the mean of its rank shares under every "
                        "model, and its own rule keeps a pair only if every model's does)")
    p.add_argument("--combine", default="mean", metavar="mean|max",
                   help="with several --checkpoint: each detector's score is the mean (default) or the "
                        "largest of its rank shares under the models; max keeps only what every model ranks low")
    p.add_argument("--reference", default=None, metavar="CHECKPOINT",
                   help="a model trained without this data (e.g. on a small trusted set), for the detectors "
                        "that compare the scanned model with it (shift); it encodes the pairs once")
    p.add_argument("--model", default=None, help="model name if the checkpoint has no state.json")
    p.add_argument("--out", required=True, help="scan folder")
    p.add_argument("--detector", action="extend", nargs="+", default=None, metavar="NAME",
                   help="detectors to run, in order (repeatable or comma-separated; default: every "
                        "registered one, those that compare with --reference only when it is given)")
    p.add_argument("--detector-option", action="extend", nargs="+", default=[], metavar="NAME.KEY=VALUE",
                   help="a detector option, e.g. dao.k=32 or lid.space=joint (repeatable)")
    p.add_argument("--attack-manifest", default=None,
                   help="the poisoned data's manifest.json: adds AUROC, AUPRC, TPR@1%%FPR, precision@k and plots")
    p.add_argument("--keep-detector", default=None,
                   help="detector whose rule writes kept.csv (default: the first --detector, or dao)")
    p.add_argument("--keep-fraction", type=float, default=None,
                   help="keep this fraction of pairs with the lowest scores instead of the detector's rule")
    p.add_argument("--veto-detector", action="extend", nargs="+", default=[], metavar="NAME",
                   help="also drop the pairs this detector's own rule rejects (repeatable; run even when "
                        "not in --detector), e.g. repeat, which flags the copies targeted poisoning makes")
    p.add_argument("--within", default=None, metavar="SCAN_DIR",
                   help="an earlier scan of the same data (its --out): keep only pairs it kept too, so a second "
                        "pass cannot let back what the first dropped")
    p.add_argument("--top", type=int, default=100, help="rows in suspicious.csv (default 100)")
    p.add_argument("--overwrite", action="store_true", help="replace a scan already in --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per encoding batch")
    p.add_argument("--chunk", type=int, default=4096, help="query rows per block of the exact neighbour search")
    p.add_argument("--neighbour-search", default="exact", choices=["exact", "ivf"],
                   help="exact (default), or ivf: approximate, with faiss (pip install 'clipguard[ann]'), for "
                        "hundreds of thousands of pairs on a CPU; its recall is measured and written to scan.json")
    p.add_argument("--nprobe", type=int, default=None,
                   help="ivf: cells each query searches (default 32, or a 64th of the cells when more; more: higher recall, slower)")
    p.add_argument("--nlist", type=int, default=None, help="ivf: k-means cells (default 4 x sqrt(pairs))")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--dataset-type", default="auto", choices=["auto", "csv", "webdataset"])
    p.add_argument("--lazy-images", action="store_true", help="decode images on demand (data larger than memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_csv_args(p)
    p.set_defaults(func=run)


def _search(args: argparse.Namespace) -> dict:
    """The --neighbour-search flags given, as NeighbourSearch's fields."""
    given = {"method": args.neighbour_search, "nprobe": args.nprobe, "nlist": args.nlist}
    return {k: v for k, v in given.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from clipguard.detection.runner import parse_detector_options, scan

    checkpoint = args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint
    summary = scan(args.data, checkpoint, args.out, model=args.model, detectors=args.detector,
                   options=parse_detector_options(args.detector_option), attack_manifest=args.attack_manifest,
                   keep_fraction=args.keep_fraction, keep_detector=args.keep_detector,
                   veto_detectors=args.veto_detector, top=args.top, overwrite=args.overwrite, device=args.device, batch_size=args.batch_size,
                   spec=csv_spec(args), dataset_type=args.dataset_type, lazy_images=args.lazy_images,
                   limit=args.limit, skip_bad_rows=args.skip_bad_rows, chunk=args.chunk,
                   progress=not args.quiet, combine=args.combine, reference=args.reference, within=args.within,
                   search=_search(args))
    n = summary["n_pairs"]
    for name, rec in summary["detectors"].items():
        m = rec.get("metrics") or {}
        auc = f"  AUROC {m['auroc']:.3f}  AUPRC {m['auprc']:.3f}" if m.get("auroc") is not None else ""
        print(f"{name:>10}: keeps {rec['keep']['kept']}/{n}  {rec['pairs_per_s'] or 0:.0f} pairs/s{auc}")
    keep = summary["keep"]
    extra = f", {keep['poisons_kept']} of {summary['n_poisoned']} poisons" if "poisons_kept" in keep else ""
    vetoes = "".join(f" + {v['detector']} veto" for v in keep.get("vetoes", []))
    vetoes += f" within {keep['within']}" if "within" in keep else ""
    print(f"kept {keep['kept']} of {n} pairs by {keep['detector']} ({keep['rule']}{vetoes}{extra}): "
          f"{args.out}/{keep['file']}")
    return 0
