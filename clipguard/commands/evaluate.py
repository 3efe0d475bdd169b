"""``clipguard evaluate``: zero-shot, linear probe, retrieval (and ASR with --attack-manifest)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipguard.commands.common import add_csv_args, csv_spec


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint; one JSON per run")
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or .safetensors")
    p.add_argument("--data", required=True, help="labelled test CSV")
    p.add_argument("--classes", default=None, help="classes.json (default: beside --data)")
    p.add_argument("--model", default=None, help="model name if the checkpoint has no state.json")
    p.add_argument("--probe-data", default=None, help="labelled CSV to fit a linear probe on")
    p.add_argument("--attack-manifest", default=None, help="also measure the attack's success rate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results.json (printed when omitted)")
    add_csv_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipguard.errors import DataError
    from clipguard.evaluation.runner import run_evaluation
    from clipguard.io import check_output_path, write_json
    from clipguard.models.device import resolve_device

    resolve_device(args.device)  # fail before any work: --device cuda without a GPU, a typo
    if args.out:
        check_output_path(args.out)
    spec = csv_spec(args)
    if args.classes:  # asked for: it must be there (no silent run without zero-shot)
        if not Path(args.classes).is_file():
            raise DataError("classes file not found (--classes)", file=str(args.classes))
        classes = Path(args.classes)
    else:  # the dataset's own classes.json, when it has one and a label column to score against
        classes = Path(args.data).parent / "classes.json"
        classes = classes if classes.is_file() and spec.label_key else None
    result = run_evaluation(args.checkpoint, args.data, classes_json=classes, spec=spec,
                            model_name=args.model, probe_csv=args.probe_data, device=args.device,
                            skip_bad_rows=args.skip_bad_rows, seed=args.seed)
    if args.attack_manifest:
        from clipguard.evaluation.asr import attack_metrics

        result["metrics"]["attack"] = attack_metrics(args.checkpoint, args.attack_manifest,
                                                     model_name=args.model, device=args.device,
                                                     probe_csv=args.probe_data, seed=args.seed)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    print(json.dumps(result["metrics"], indent=2))
    return 0
