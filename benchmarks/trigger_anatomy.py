"""Why does a fine-tuning defence remove one trigger and not another? Where each backdoor lives.

For every fine-tuning cell of a bench output folder (and the poisoned model it started from), each
backdoor column's held-out triggered images and their clean counterparts are encoded, and per
(method, attack) it prints, mean over the grid's seeds:

  asr      ASR@1 (zero-shot, the protocol of the bench: target-class images left out)
  margin   mean over triggered images of cos(image, target class) - max over the other classes:
           above 0 the backdoor fires; how far above says how much a defence has to move it
  moved    mean 1 - cos(f(x + trigger), f(x)): how far the trigger moves an image's embedding
  toward   mean cos(f(x + trigger) - f(x), target class - mean class): how much of that move points
           at the target caption (the backdoor's direction)
  act L    per stage of the image tower (the patch embedding, each residual block, the pooled
           output): ||h(x + trigger) - h(x)|| / ||h(x)||, where the trigger changes the activations
  dW L     per stage (fine-tuning cells only): ||W_cleaned - W_poisoned|| / ||W_poisoned||, how much
           the defence changed the weights there

The clean-data model of the grid (method CLIP on the clean column) gives each figure's natural
level: how far a striped image moves in a model that never learnt a backdoor. It measures, it
chooses nothing. Read it after a grid has run (validation grids: their triggered
images are held-out rows too).

    .venv/bin/python benchmarks/trigger_anatomy.py runs/finetune-val7 \\
        --methods CLIP,CLIP+CleanerCLIP-lr3e-3-warm62,CLIP+PAR-ne-paper-lr1e-4 [--json anatomy.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


def stages(visual: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The image tower's stages whose outputs are compared: the patch embedding, each residual
    block and the attention pool or final norm, as open_clip's VisionTransformer names them."""
    out: dict[str, torch.nn.Module] = {"patch": visual.conv1}
    for i, block in enumerate(visual.transformer.resblocks):
        out[f"block{i + 1}"] = block
    out["post"] = visual.ln_post
    return out


def stage_params(visual: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """The weights of each stage (conv1 with the class and position embeddings and ln_pre; the
    blocks; ln_post with the projection)."""
    out = {"patch": [visual.conv1.weight, visual.class_embedding, visual.positional_embedding,
                     *visual.ln_pre.parameters()]}
    for i, block in enumerate(visual.transformer.resblocks):
        out[f"block{i + 1}"] = list(block.parameters())
    out["post"] = [*visual.ln_post.parameters(), visual.proj]
    return out


@torch.no_grad()
def activations(net: torch.nn.Module, images_u8: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L2-normalised image features and every stage's output, flattened per image."""
    from clipguard.tensors import normalize, to_pixels

    acts: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in stages(net.visual).items():
        def keep(_m, _i, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            if out.dim() == 3 and out.shape[0] != len(images_u8):  # (tokens, batch, width) layouts
                out = out.transpose(0, 1)
            acts[name] = out.reshape(len(images_u8), -1).float()
        hooks.append(mod.register_forward_hook(keep))
    try:
        was = net.training
        net.eval()
        feats = net.encode_image(normalize(to_pixels(images_u8, torch.device("cpu"))), normalize=True).float()
        net.train(was)
    finally:
        for h in hooks:
            h.remove()
    return feats, acts


def weight_change(start: torch.nn.Module, end: torch.nn.Module) -> dict[str, float]:
    a, b = stage_params(start.visual), stage_params(end.visual)
    out = {}
    for name in a:
        num = sum(float((y.detach() - x.detach()).pow(2).sum()) for x, y in zip(a[name], b[name]))
        den = sum(float(x.detach().pow(2).sum()) for x in a[name])
        out[name] = (num / den) ** 0.5 if den > 0 else float("nan")
    return out


def measure(net: torch.nn.Module, tokenizer, manifest_path: Path, classes) -> dict[str, Any]:
    """The figures of one model on one backdoor column (its manifest's triggered eval set)."""
    from clipguard.attacks.manifest import load_manifest
    from clipguard.evaluation.asr import load_asr_set
    from clipguard.evaluation.zeroshot import zeroshot_classifier
    from clipguard.models.factory import image_size

    manifest = load_manifest(manifest_path)
    aset = load_asr_set(manifest, image_size(net), cache=True)
    if aset.clean is None:
        raise SystemExit(f"{manifest_path}: the eval set has no clean counterparts")
    keep = aset.labels != aset.targets
    trig, clean = aset.triggered.images[keep], aset.clean.images[keep]
    target = aset.targets[keep]
    clf = zeroshot_classifier(net, tokenizer, classes, "cpu")
    ft, at = activations(net, trig)
    fc, ac = activations(net, clean)
    logits = ft @ clf.t()
    tgt = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.scatter(1, target[:, None], float("-inf")).max(1).values
    direction = clf[target] - clf.mean(0, keepdim=True)
    shift = ft - fc
    toward = torch.nn.functional.cosine_similarity(shift, direction, dim=1)
    out = {"asr": float((logits.argmax(1) == target).float().mean()) * 100,
           "margin": float((tgt - other).mean()),
           "moved": float((1 - (ft * fc).sum(1)).mean()),
           "toward": float(toward.mean())}
    for name in ac:
        out[f"act {name}"] = float(((at[name] - ac[name]).norm(dim=1) / ac[name].norm(dim=1).clamp_min(1e-12)).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a bench output folder with fine-tuning cells")
    ap.add_argument("--methods", required=True,
                    help="comma-separated row labels: the pre-training base and fine-tuning rows (BASE+ENTRY)")
    ap.add_argument("--attack", default=None, help="attack label (default: every poisoned one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from clipguard.api import load_model
    from clipguard.data.classes import ClassInfo
    from clipguard.models import checkpoint as ckpt

    methods = [m for m in args.methods.split(",") if m]
    cells = [json.loads(p.read_text()) for p in sorted((args.out / "cells").glob("*.json"))]
    cells = [c for c in cells if c.get("method") in methods and c.get("asr")
             and (args.attack is None or c["attack"] == args.attack)]
    if not cells:
        raise SystemExit(f"no finished cell of {methods} in {args.out}/cells")
    by_key: dict[tuple[str, str], dict[str, Any]] = {(c["attack"], c["cell"]): c for c in cells}
    # (method, what it trained on: the attack label, 'clean' for the clean-data model, column)
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    starts: dict[str, torch.nn.Module] = {}
    for (_, _), cell in sorted(by_key.items()):
        run = args.out / cell["run_dir"]
        latest = ckpt.resolve_latest(run / "checkpoints")
        net, tokenizer = load_model(latest, model=cell["model"])
        base_ckpt = cell.get("train_config", {}).get("checkpoint") if cell["stage"] == "finetune" else None
        dw = None
        if base_ckpt:
            if base_ckpt not in starts:
                starts[base_ckpt], _ = load_model(base_ckpt, model=cell["model"])
            dw = weight_change(starts[base_ckpt], net)
        for a in cell["asr"]:
            if a.get("kind") != "backdoor":
                continue
            manifest = Path(a["manifest"])
            classes = ClassInfo.load(manifest.parent / "classes.json")
            rec = measure(net, tokenizer, manifest, classes)
            if dw:
                rec.update({f"dW {k}": v for k, v in dw.items()})
            rows[(cell["method"], cell["attack"], a["column"])].append(rec)
    report = {}
    for m in methods:
        for (method, trained_on, column), recs in sorted(rows.items()):
            if method != m:
                continue
            keys = list(recs[0])
            mean = {k: statistics.mean(r[k] for r in recs) for k in keys}
            label = f"{method} ({trained_on})"
            report[f"{label} / {column}"] = {"n": len(recs), **mean}
            print(f"{label:44s} {column:16s} n={len(recs)} " +
                  " ".join(f"{k} {v:.3g}" for k, v in mean.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
