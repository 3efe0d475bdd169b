"""GPU check: images/s and peak GPU memory of clipguard's trainer (plain CLIP and each defence)
against a minimal open_clip training loop, side by side in one process, on synthetic data.

Nothing is downloaded: images are random uint8 tensors at the model's input size, captions are
random sentences, and models start from random weights. Rows, in order:

  open_clip         open_clip.create_model + open_clip.ClipLoss + AdamW + autocast, ~20 lines
  clipguard none    the trainer with plain CLIP
  clipguard D       the trainer with defence D in its own training phase: SafeCLIP twice (its
                    unimodal NNCLR phase and its mixed phase, safe set chosen at the epoch start),
                    RoCLIP in a pool-matching epoch, every other defence in its one phase
  clipguard padded  plain CLIP with trim_text off (only where it is on: a GPU, or --trim-text):
                    the text tower over the padding too, as the open_clip row runs it
  clipguard lazy    plain CLIP on the same images written as JPEG files at 1.25x the input size,
                    each decoded, resized and cropped on demand by --workers threads while the
                    GPU trains: does decoding keep the GPU fed? (--no-lazy leaves it out)
  open_clip again   the minimal loop once more (drift between the first and last row)

Each row runs --warmup-steps untimed steps, then --steps timed ones; images/s counts the timed
steps only, with the GPU synchronised at both ends. start_s is a row's time to its first step (model
built, data moved, epoch-start hook); a trainer row's hook (SafeCLIP's split, RoCLIP's pool fill)
is also reported alone as hook_s. Checkpoints are not written (they are not what is measured). Peak memory includes the dataset,
which the trainer holds on the GPU while it fits (below 2^31 bytes), and so does the minimal loop.
The JSON is rewritten after every row ("complete": false until the end), so a run cut short
still leaves the rows it measured.

    python benchmarks/gpu_check.py --out gpu_check.json                 # ViT-B-32, bf16, < 5 min on one H200
    python benchmarks/gpu_check.py --compile --channels-last --defenses none --out compiled.json
    python benchmarks/gpu_check.py --model cg-nano --device cpu --steps 3 --out cpu.json   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import logging
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

import clipguard
from clipguard import defenses
from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.io import read_jsonl, write_json
from clipguard.models.device import resolve_device
from clipguard.models.factory import get_tokenizer, model_image_size, register_model_configs
from clipguard.models.text_trim import trim_wanted
from clipguard.tensors import normalize
from clipguard.training.build import build_trainer
from clipguard.training.losses import MAX_LOGIT_SCALE
from clipguard.training.optim import make_optimizer
from clipguard.training.spec import resolve_spec

ON_DEVICE_LIMIT = 2 ** 31  # the trainer keeps in-memory images on the GPU below this many elements

# (phase label, defence options, train settings): settings that put the measured epoch in that phase
PHASES: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {
    "none": [("clip", {}, {"epochs": 1})],
    "safeclip": [("unimodal", {"warmup_epochs": 1, "clip_warmup_epochs": 0}, {"epochs": 2, "stop_after": 1}),
                 ("mixed", {"warmup_epochs": 0, "clip_warmup_epochs": 0}, {"epochs": 1})],
    "roclip": [("pool", {"match_every": 1}, {"epochs": 1})],
}

_ADJ = ("small", "large", "red", "blue", "old", "young", "happy", "wooden", "bright", "dark", "green", "white")
_NOUN = ("dog", "cat", "man", "woman", "car", "house", "tree", "bird", "boat", "child", "table", "street",
         "flower", "horse", "mountain", "river", "city", "bicycle", "kitchen", "beach")
_VERB = ("running", "sitting", "standing", "walking", "sleeping", "playing", "looking", "waiting")
_PREP = ("on", "near", "in front of", "behind", "beside", "under", "across")


def synthetic_data(n: int, size: int, seed: int) -> ImageCaptionData:
    """``n`` random uint8 images (3 x size x size) with random English captions (EDA finds synonyms)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    rng = random.Random(seed)
    captions = [f"a {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} {rng.choice(_PREP)} "
                f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)}" for _ in range(n)]
    return ImageCaptionData(images=images, captions=captions, labels=torch.full((n,), -1, dtype=torch.long),
                            paths=[""] * n, source="synthetic")


def _quiet_random_init(record: logging.LogRecord) -> bool:
    """Drop open_clip's 'No pretrained weights loaded' warning: random weights are the point here."""
    return "No pretrained weights loaded" not in record.getMessage()


def jpeg_copy(data: ImageCaptionData, folder: Path, size: int, threads: int) -> ImageCaptionData:
    """``data`` as JPEG files (at 1.25x ``size``) and a CSV, loaded back as on-demand images."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from clipguard.data.csv_dataset import load_csv, write_csv

    folder.mkdir(parents=True, exist_ok=True)
    big = round(size * 1.25)

    def write(i: int) -> dict[str, str]:
        name = f"{i:06d}.jpg"
        im = Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).resize((big, big), Image.BILINEAR)
        im.save(folder / name, quality=90)
        return {"filepath": name, "title": data.captions[i]}

    with ThreadPoolExecutor(threads) as pool:
        rows = list(pool.map(write, range(len(data))))
    write_csv(folder / "train.csv", rows, ["filepath", "title"])
    return load_csv(folder / "train.csv", image_size=size, lazy=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def resolve_precision(precision: str, dev: torch.device) -> str:
    """The trainer's rule: 'auto' is bf16 on a GPU that has it, else fp32."""
    if precision == "auto":
        return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_for(precision: str, dev: torch.device) -> Callable[[], Any]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(dev.type, dtype=dtype)


def fresh_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 3) if dev.type == "cuda" else None


# ---------------------------------------------------------------------------- the minimal open_clip loop
def open_clip_row(data: ImageCaptionData, args, dev: torch.device) -> dict[str, Any]:
    """What a user writes with open_clip alone: same model, data, batch, optimizer and precision."""
    t_row = time.perf_counter()
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.model, pretrained=None, device=dev)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if args.compile else model
    tokens = open_clip.get_tokenizer(args.model)(data.captions)
    images = data.images
    if dev.type == "cuda" and images.numel() < ON_DEVICE_LIMIT:
        images, tokens = images.to(dev), tokens.to(dev)
    opt = make_optimizer(model, args.lr, 0.2)  # AdamW with open_clip's parameter groups
    loss_fn = open_clip.ClipLoss()
    precision = resolve_precision(args.precision, dev)
    autocast = autocast_for(precision, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp")
    b, total = args.batch_size, args.warmup_steps + args.steps
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    t0 = loss = start_s = None
    for s in range(total):
        if s == 0:
            start_s = time.perf_counter() - t_row
        if s == args.warmup_steps:
            sync(dev)
            t0 = time.perf_counter()
        idx = perm[s * b:(s + 1) * b]
        u8 = images[idx.to(images.device)]
        if u8.device != dev and dev.type == "cuda":  # host-held data: pinned, copied asynchronously
            u8 = u8.pin_memory()
        px = normalize(u8.to(dev, non_blocking=True).float().div_(255.0))
        if args.channels_last:
            px = px.contiguous(memory_format=torch.channels_last)
        with autocast():
            img, txt, scale = forward(px, tokens[idx.to(tokens.device)].to(dev))[:3]
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    sync(dev)
    seconds = time.perf_counter() - t0
    return {"images_per_s": args.steps * b / seconds, "ms_per_step": 1000 * seconds / args.steps,
            "start_s": start_s, "loss": float(loss.detach()), "precision": precision,
            "images_on_device": images.device == dev}


# ---------------------------------------------------------------------------- clipguard's trainer
class StepClock:
    """Marks the start of every step's loss (and the epoch's end), the GPU synchronised first.

    The trainer already waits for each step's loss value, so the extra synchronisation costs
    nothing measurable; the interval between two marks is one whole step (loss, backward,
    optimizer step, and the next batch's gathering)."""

    def __init__(self, dev: torch.device):
        self.dev, self.marks = dev, []

    def mark(self) -> None:
        sync(self.dev)
        self.marks.append(time.perf_counter())

    def before(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a, **kw):
            self.mark()
            return fn(*a, **kw)
        return wrapped


def clipguard_row(defense: str, options: dict[str, Any], settings: dict[str, Any], data: ImageCaptionData,
                  args, dev: torch.device) -> dict[str, Any]:
    t_row = time.perf_counter()
    spe = args.warmup_steps + args.steps
    train = {"model": args.model, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup_steps,
             "grad_clip": args.grad_clip, "seed": args.seed, "device": str(dev), "precision": args.precision,
             "compile": args.compile, "channels_last": args.channels_last, "workers": args.workers,
             "trim_text": args.trim_text, "quiet": True, "keep_checkpoints": 1, **settings}
    spec = resolve_spec(defense=defense, options=options, train=train, where=f"gpu_check {defense}")
    clock = StepClock(dev)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(spec, data, Path(tmp) / "run")
        trainer._save = lambda epoch, step: None  # checkpoints are not what is measured
        strat = trainer.strategy
        strat.loss = clock.before(strat.loss)  # instance attributes: the trainer calls these
        strat.on_epoch_end = clock.before(strat.on_epoch_end)
        trainer.fit()
        records = read_jsonl(Path(tmp) / "run" / "results.jsonl")
    last = records[-1]
    # the measured epoch is the last one run: its marks are its steps' starts and its end
    marks = clock.marks[-(spe + 1):]
    if len(marks) != spe + 1 or trainer.ctx.steps_per_epoch != spe:
        raise RuntimeError(f"expected {spe} steps in the measured epoch, saw {len(marks) - 1}")
    seconds = marks[-1] - marks[args.warmup_steps]
    loss = last.get("loss")
    row = {"images_per_s": args.steps * args.batch_size / seconds, "ms_per_step": 1000 * seconds / args.steps,
           "start_s": clock.marks[0] - t_row, "hook_s": last.get("hook_seconds"),
           "loss": loss, "precision": trainer.precision, "images_on_device": getattr(trainer.images, "device", None) == dev}
    if "phase" in last and last["phase"] is not None:
        row["trainer_phase"] = last["phase"]
    del trainer, strat
    return row


# ---------------------------------------------------------------------------- the run
def plan(defense_names: list[str]) -> list[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    """(label, defense, phase, options, train settings) of every trainer row."""
    rows = []
    for name in defense_names:
        for phase, opts, settings in PHASES.get(name, [("standard", {}, {"epochs": 1})]):
            rows.append((f"clipguard {name} ({phase})", name, phase, opts, settings))
    return rows


def environment(dev: torch.device) -> dict[str, Any]:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "torch": torch.__version__, "open_clip": open_clip.__version__, "clipguard": clipguard.__version__,
           "cuda": torch.version.cuda if dev.type == "cuda" else None, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads()}
    return env


def print_table(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(f"\n{s['model']} {s['image_size']}px, batch {s['batch_size']}, {s['precision']}, "
          f"compile {'on' if s['compile'] else 'off'}, channels_last {'on' if s['channels_last'] else 'off'}, "
          f"trim_text {'on' if s.get('trim_text') else 'off'}; "
          f"{s['steps']} timed steps after {s['warmup_steps']} warm-up; "
          f"{result['gpu'] or result['device']}, torch {result['torch']}, open_clip {result['open_clip']}")
    print(f"{'run':40s} {'images/s':>10s} {'ms/step':>9s} {'/open_clip':>10s} {'peak GiB':>9s} {'hook s':>7s}")

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(int(spec.split(".")[0]))

    for r in result["rows"]:
        if "error" in r or "skipped" in r:
            print(f"{r['run']:40s} {'ERROR: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
            continue
        print(f"{r['run']:40s} {fmt(r['images_per_s'], '10.1f')} {fmt(r['ms_per_step'], '9.1f')} "
              f"{fmt(r.get('vs_open_clip'), '10.3f')} {fmt(r.get('peak_gib'), '9.2f')} {fmt(r.get('hook_s'), '7.2f')}")
    print(f"wall {result['wall_s']:.1f} s", flush=True)


def finish(result: dict[str, Any], t_start: float, out: str, complete: bool) -> None:
    """Ratios to the open_clip rows measured so far, the wall time, and the JSON written."""
    rows = result["rows"]
    base = [r["images_per_s"] for r in rows if r["kind"] == "open_clip" and "images_per_s" in r]
    ref = sum(base) / len(base) if base else None
    for r in rows:
        if ref and "images_per_s" in r:
            r["vs_open_clip"] = r["images_per_s"] / ref
    result["open_clip_images_per_s"] = ref
    result["wall_s"] = time.perf_counter() - t_start
    result["complete"] = complete
    write_json(out, result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row")
    ap.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per row before the timed ones")
    ap.add_argument("--defenses", default="none,safeclip,roclip,cleanclip,par",
                    help="comma-separated; 'none' is plain CLIP")
    ap.add_argument("--precision", default="bf16", choices=["auto", "fp32", "bf16", "amp"])
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile both loops (adds a compilation, tens of seconds, to every row)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--trim-text", action=argparse.BooleanOptionalAction, default=None,
                    help="the trainer's text tower on the captions only (default: the trainer's, on for a GPU)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="both loops (the trainer's default); 0: off")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=270.0,
                    help="rows not started by then are skipped (the whole check stays under 5 minutes)")
    ap.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                    help="also time plain CLIP on the images as JPEG files decoded on demand")
    ap.add_argument("--workers", type=int, default=8, help="decoding (and JPEG writing) threads of the lazy row")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().addFilter(_quiet_random_init)
    if args.steps < 1 or args.warmup_steps < 1 or args.batch_size < 2 or args.workers < 1:
        ap.error("--steps, --warmup-steps and --workers must be >= 1 and --batch-size >= 2")
    t_start = time.perf_counter()
    dev = resolve_device(args.device)
    if args.precision == "amp" and dev.type != "cuda":
        ap.error("--precision amp (fp16 + scaler) needs a GPU; use bf16 or fp32 on the CPU")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    register_model_configs()  # open_clip then knows clipguard's configs too (cg-nano, ...)
    names = [n.strip() for n in args.defenses.split(",") if n.strip()]
    for n in names:
        defenses.get(n)  # an unknown name fails now, listing the known ones
    size = model_image_size(args.model)
    pairs = (args.warmup_steps + args.steps) * args.batch_size  # one epoch = warm-up + timed steps
    data = synthetic_data(pairs, size, args.seed)
    get_tokenizer(args.model)(data.captions)  # tokenise once; the memo serves every trainer row
    result: dict[str, Any] = environment(dev)
    result["argv"] = list(sys.argv[1:] if argv is None else argv)
    result["settings"] = {"model": args.model, "image_size": size, "batch_size": args.batch_size,
                          "steps": args.steps, "warmup_steps": args.warmup_steps, "pairs": pairs,
                          "precision": resolve_precision(args.precision, dev), "compile": args.compile,
                          "channels_last": args.channels_last, "lr": args.lr, "grad_clip": args.grad_clip,
                          "trim_text": trim_wanted(args.trim_text, dev),
                          "seed": args.seed, "defenses": names, "lazy": args.lazy, "workers": args.workers,
                          "dataset_gib": round(data.images.numel() / 2 ** 30, 3)}
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, Callable[[], dict[str, Any]], dict[str, Any]]] = [
        ("open_clip minimal loop", lambda: open_clip_row(data, args, dev), {"kind": "open_clip"})]
    for label, name, phase, opts, settings in plan(names):
        jobs.append((label, lambda n=name, o=opts, st=settings: clipguard_row(n, o, st, data, args, dev),
                     {"kind": "clipguard", "defense": name, "phase": phase, "options": opts}))
        if name == "none" and result["settings"]["trim_text"]:  # what trimming the text gains, alone
            jobs.append(("clipguard none (clip, padded text)",
                         lambda: clipguard_row("none", {}, {"epochs": 1, "trim_text": False}, data, args, dev),
                         {"kind": "clipguard", "defense": "none", "phase": "clip", "options": {}, "trim_text": False}))
    lazy_dir = tempfile.TemporaryDirectory() if args.lazy else None
    if lazy_dir is not None:
        def lazy_row() -> dict[str, Any]:
            t0 = time.perf_counter()
            lazy = jpeg_copy(data, Path(lazy_dir.name) / "jpeg", size, args.workers)
            write_s = time.perf_counter() - t0
            return {**clipguard_row("none", {}, {"epochs": 1}, lazy, args, dev), "jpeg_write_s": write_s}

        jobs.append((f"clipguard none (lazy JPEG, {args.workers} workers)", lazy_row,
                     {"kind": "clipguard", "defense": "none", "phase": "clip", "options": {}, "lazy": True}))
    jobs.append(("open_clip minimal loop (again)", lambda: open_clip_row(data, args, dev), {"kind": "open_clip"}))
    result["rows"] = rows
    try:
        for label, job, meta in jobs:
            row: dict[str, Any] = {"run": label, **meta}
            if time.perf_counter() - t_start > args.max_seconds:
                row["skipped"] = f"--max-seconds {args.max_seconds:g} reached"
            else:
                fresh_memory(dev)
                try:
                    row.update(job())
                    row["peak_gib"] = peak_gib(dev)
                except Exception as e:  # report it and measure the others
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    traceback.print_exc(file=sys.stderr)
            rows.append(row)
            print(f"{label}: " + (f"{row['images_per_s']:.1f} images/s" if "images_per_s" in row
                                  else row.get("error") or row.get("skipped")), flush=True)
            finish(result, t_start, args.out, complete=False)
    finally:
        if lazy_dir is not None:
            lazy_dir.cleanup()
    finish(result, t_start, args.out, complete=True)
    print_table(result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
