"""Which captions does a RoCLIP pool epoch give the pairs it re-pairs?

Loads a trained model (a run's latest checkpoint), matches every training pair's image against
random pools of training captions as a pool epoch does (each image picks its nearest pooled
caption; a pair agrees when the pick ranks within the ``keep_own`` share of the pool nearest to
its own caption), and reports, over ``--pools`` random pools:

- the share of clean pairs that agree, and of those that do not, the share whose pick names their
  own class (the rest are trained on another class's caption in a pool epoch);
- the gap in cosine similarity between a pair's pick and its own caption, for the clean pairs that
  do not agree and for the mismatched pairs (poisons);
- with ``--margins``, what ``keep_own_margin`` would keep besides the rank test: clean pairs, and
  mismatched pairs in all.

A pair is clean when its caption names the class of its label (classes.json beside the CSV: class
names and synonyms); a caption naming another class, or none, counts as mismatched. The pools are
drawn from the clean captions, un-augmented, with the current model's embeddings (a pool epoch
holds augmented captions embedded a step or two earlier): a diagnostic, not a replay.

    .venv/bin/python benchmarks/roclip_repairs.py --run runs/roclip-r15/runs/fmnist/four/seed13/pretrain-keep-own-10-crop-50 \\
        --data runs/roclip-r15/poison/fmnist/four/seed13/part3-sig-*/train.csv
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from clipguard.data.classes import ClassInfo
from clipguard.data.csv_dataset import load_csv
from clipguard.defenses.roclip import pick_log_odds, pick_rank, rank_agrees
from clipguard.evaluation.features import encode_images, encode_texts
from clipguard.models.checkpoint import resolve_latest
from clipguard.models.factory import create_model, get_tokenizer, model_image_size


def caption_classes(captions: list[str], info: ClassInfo) -> torch.Tensor:
    """The class each caption names (its longest matching name or synonym; -1 for none)."""
    names = sorted(info.lookup().items(), key=lambda kv: -len(kv[0]))
    patterns = [(re.compile(r"\b" + re.escape(n) + r"\b"), i) for n, i in names]
    out = []
    for c in captions:
        low = c.lower()
        out.append(next((i for p, i in patterns if p.search(low)), -1))
    return torch.tensor(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a RoCLIP run folder (its checkpoints/ and params.json)")
    p.add_argument("--data", required=True, help="the run's training CSV, with a label column and classes.json")
    p.add_argument("--model", help="model name (default: the run's params.json)")
    p.add_argument("--pool-fraction", type=float, default=0.02)
    p.add_argument("--keep-own", type=float, default=0.1)
    p.add_argument("--pools", type=int, default=5)
    p.add_argument("--margins", type=float, nargs="*", default=[1.0, 1.5], help="keep_own_margin values, nats")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.pool_fraction <= 1 or not 0 < args.keep_own < 1 or args.pools < 1:
        p.error("--pool-fraction must be in (0, 1], --keep-own in (0, 1), --pools >= 1")
    run, csv = Path(args.run), Path(args.data)
    ckpt = resolve_latest(run / "checkpoints")
    if ckpt is None:
        p.error(f"{run}: no finished checkpoint under checkpoints/")
    name = args.model or json.loads((run / "params.json").read_text())["run"]["train"]["model"]
    data = load_csv(csv, image_size=model_image_size(name))
    if data.labels is None:
        p.error(f"{csv}: no label column")
    info = ClassInfo.load(csv.parent / "classes.json")
    labels = torch.as_tensor(data.labels)
    named = caption_classes(data.captions, info)
    clean = named == labels
    model = create_model(name, checkpoint=str(ckpt / "model.safetensors"))
    with torch.no_grad():
        img = encode_images(model, data.images, "cpu")
        txt = encode_texts(model, get_tokenizer(name), data.captions, "cpu")
        scale = float(model.logit_scale.exp())
    size = max(1, round(args.pool_fraction * len(data)))
    g = torch.Generator().manual_seed(args.seed)
    clean_rows = clean.nonzero().squeeze(1)
    rec: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rec.setdefault(key, []).append(value)

    for _ in range(args.pools):
        pool = clean_rows[torch.randperm(len(clean_rows), generator=g)[:size]]
        pick = (img @ txt[pool].t()).argmax(1)  # each image's nearest pooled caption, as NNPool picks
        agree = rank_agrees(pick_rank(txt, txt[pool], pick), args.keep_own, len(pool))
        right = named[pool][pick] == labels
        gap = pick_log_odds(img, txt[pool][pick], txt, 1.0)  # the cosine gap; x scale: the log-odds
        add("clean pairs that agree", float(agree[clean].float().mean()))
        add("re-paired clean pairs picking their own class", float(right[clean & ~agree].float().mean()))
        add("median gap, re-paired clean pairs", float(gap[clean & ~agree].median()))
        if bool((~clean).any()):
            add("median gap, mismatched pairs", float(gap[~clean].median()))
            add("mismatched pairs that agree", float(agree[~clean].sum()))
        for m in args.margins:
            kept = agree | (scale * gap < m)
            add(f"margin {m:g}: clean pairs kept", float(kept[clean].float().mean()))
            add(f"margin {m:g}: mismatched pairs kept", float(kept[~clean].sum()))
    print(f"{run}: {len(data)} pairs ({int((~clean).sum())} mismatched), pool {size}, keep_own {args.keep_own:g}, "
          f"logit scale {scale:.2f}; mean [min, max] over {args.pools} pools")
    out = {}
    for key, vals in rec.items():
        out[key] = statistics.mean(vals)
        print(f"{key:48s} {out[key]:8.3f}  [{min(vals):.3f}, {max(vals):.3f}]")
    print(json.dumps({k: round(v, 4) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
