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
    from clipguard.evaluation.runner import run_evaluation
    from clipguard.io import write_json

    classes = args.classes or (Path(args.data).parent / "classes.json")
    classes = classes if Path(classes).is_file() else None
    result = run_evaluation(args.checkpoint, args.data, classes_json=classes, spec=csv_spec(args),
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
