"""``clipguard evaluate``: zero-shot, linear probe, retrieval (and ASR with --attack-manifest)."""

from __future__ import annotations

import argparse
import json

from clipguard.commands.common import add_csv_args, csv_spec


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint; one JSON per run")
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, .safetensors, or a "
                   ".pt/.pth/.bin state dict (read with torch.load(weights_only=True))")
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
    from clipguard.api import evaluate
    from clipguard.io import check_output_path, round_floats, write_json
    from clipguard.models.device import resolve_device

    resolve_device(args.device)  # fail before any work: --device cuda without a GPU, a typo
    if args.out:
        check_output_path(args.out)
    result = evaluate(args.checkpoint, args.data, classes=args.classes, attack_manifest=args.attack_manifest,
                      probe_data=args.probe_data, device=args.device, seed=args.seed, spec=csv_spec(args),
                      model=args.model, skip_bad_rows=args.skip_bad_rows)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    print(json.dumps(round_floats(result["metrics"]), indent=2))  # the figures results.json holds
    return 0
