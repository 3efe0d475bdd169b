"""Which pairs RoCLIP's pattern veto flagged at a finished bench cell's last pool epoch, per attack part.

RoCLIP checkpoints the veto's flags (``patterned`` in each epoch's strategy.safetensors: the pairs
kept out of every step until the next pool epoch). This script reads the cell's latest checkpoint
and the poison manifests of its seed and prints how many of each attack part's pairs were flagged,
and how many clean pairs. Diagnostics only: it reads the attack manifest, which no training choice
may do.

    .venv/bin/python benchmarks/roclip_veto_flags.py runs/roclip-r29 fmnist/four/pat4-text-poolcrop100/seed67
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from clipguard.evaluation.detection import read_manifest


def veto_flags(out: str | Path, cell: str) -> dict[str, tuple[int, int]]:
    """{part: (flagged, pairs)} and {"clean": (flagged, pairs)} for ``cell`` (dataset/attack/entry/seedS)
    of the bench folder ``out``, from the last checkpoint that holds the veto's flags."""
    out = Path(out)
    try:
        dataset, attack, entry, seed = cell.strip("/").split("/")
    except ValueError:
        raise SystemExit(f"{cell}: expected DATASET/ATTACK/ENTRY/seedS (a bench cell id)") from None
    run = out / "runs" / dataset / attack / seed / f"pretrain-{entry}"
    states = sorted(run.glob("checkpoints/epoch_*/strategy.safetensors"))
    flags = None
    for path in reversed(states):
        tensors = load_file(str(path))
        if "patterned" in tensors:
            flags = tensors["patterned"].bool().numpy()
            break
    if flags is None:
        raise SystemExit(f"{run}: no checkpoint with the pattern veto's flags (a RoCLIP cell with pattern_z on?)")
    manifests = sorted((out / "poison" / dataset / attack / seed).glob("part*/manifest.json"))
    poisoned = np.zeros(len(flags), dtype=bool)
    result: dict[str, tuple[int, int]] = {}
    for path in manifests:
        m = read_manifest(path)
        rows = np.asarray(m["poisoned_rows"], dtype=np.int64)
        poisoned[rows] = True
        result[path.parent.name] = (int(flags[rows].sum()), len(rows))
    result["clean"] = (int(flags[~poisoned].sum()), int((~poisoned).sum()))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="a bench output folder")
    p.add_argument("cell", nargs="+", help="cell ids: DATASET/ATTACK/ENTRY/seedS")
    args = p.parse_args(argv)
    for cell in args.cell:
        counts = veto_flags(args.out, cell)
        print(cell + ": " + ", ".join(f"{name} {f}/{n}" for name, (f, n) in counts.items()))


if __name__ == "__main__":
    main()
