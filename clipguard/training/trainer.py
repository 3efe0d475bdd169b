"""The one training loop. Defences plug in as strategies; this file never learns their names.

DDP-ready (torchrun, gloo or NCCL), AMP on GPUs, gradient accumulation, gradient clipping,
logit-scale clamp, an atomic checkpoint every epoch and an exact ``resume``. GPU speed options
(``compile``, ``channels_last``, ``workers``, ``pin_memory``) change how fast a step runs, never
what it computes, and do nothing on the CPU unless asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from tqdm.auto import tqdm

import clipguard
from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.errors import ConfigError
from clipguard.io import append_jsonl, read_json_object, read_jsonl, round_floats, write_json, write_text
from clipguard.models import checkpoint as ckpt
from clipguard.models.device import resolve_device
from clipguard.models.factory import create_model, get_tokenizer, image_size
from clipguard.options import Options, require
from clipguard.tensors import to_pixels
from clipguard.training import run_dir
from clipguard.training.context import Batch, StepModule, TrainContext, step_seed
from clipguard.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from clipguard.training.losses import MAX_LOGIT_SCALE
from clipguard.training.optim import clip_grad_norm, make_optimizer
from clipguard.training.strategy import ClipStrategy, Strategy

log = logging.getLogger("clipguard")
STATE_FORMAT = 2  # state.json's "epoch" counts finished epochs (format 1: the 0-based last epoch)

EpochCallback = Callable[[torch.nn.Module, int], dict[str, Any]]
DiagnosticsCallback = Callable[[Strategy, int, Path], dict[str, Any]]


# settings that decide neither the trained weights (up to kernel-level float differences on a GPU) nor
# a run's fingerprint: a resume or a bench cell may change them, and adding one keeps old runs valid
RUNTIME_KEYS = ("quiet", "bar_position", "tensorboard", "keep_checkpoints", "stop_after", "eval_every",
                "compile", "channels_last", "workers", "pin_memory", "trim_text")


@dataclass
class TrainConfig(Options):
    """Settings of the one training loop; every front end (CLI, preset, bench) resolves into this."""

    kind: ClassVar[str] = "training"
    model: str = "cg-tiny"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup: int = 50
    weight_decay: float = 0.2
    grad_clip: float | None = 1.0
    accum_steps: int = 1
    seed: int = 0
    precision: Literal["auto", "fp32", "amp", "bf16"] = "auto"  # amp = fp16 + scaler
    device: str = "auto"
    checkpoint: str | None = None  # initial weights (fine-tuning starts here, fresh optimizer)
    keep_checkpoints: int = 2
    stop_after: int | None = None  # run at most this many epochs now (time-sliced jobs)
    eval_every: int = 1
    tensorboard: bool = False
    quiet: bool = False
    bar_position: int | None = None  # terminal line of the epoch bar (bench workers: one each)
    # speed only (see RUNTIME_KEYS); the defaults change nothing
    compile: bool = False         # torch.compile the step's forward; checkpoints stay plain open_clip
    channels_last: bool = False   # NHWC weights and pixels (helps convolutional towers, e.g. RN50, on GPUs)
    workers: int | None = None    # threads decoding on-demand (--lazy-images, shards) images; None: 8
    pin_memory: bool = True       # CUDA only: host batches are pinned, prefetched and copied asynchronously
    trim_text: bool | None = None  # text tower on the captions, not their padding (None: on a GPU only)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        require(bool(self.model.strip()), "option 'model' must name a model")
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}")
        require(0.0 <= self.lr <= 1.0, f"lr must be in [0, 1], got {self.lr}")
        require(0.0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr = {self.lr}], got {self.min_lr}")
        require(self.warmup >= 0, f"warmup must be >= 0 steps, got {self.warmup}")
        require(0.0 <= self.weight_decay <= 10.0, f"weight_decay must be in [0, 10], got {self.weight_decay}")
        require(self.grad_clip is None or self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        require(self.stop_after is None or self.stop_after >= 1, f"stop_after must be >= 1, got {self.stop_after}")
        require(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        require(self.workers is None or self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        try:
            resolve_device(self.device)  # the one device check: a typo or a missing GPU fails here
        except ConfigError as e:
            raise ValueError(str(e)) from None

    def result_settings(self) -> dict[str, Any]:
        """The settings that decide the trained weights (not where bars go or how many checkpoints stay)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}


def every_parameter_trains(model: torch.nn.Module, strategy: Strategy) -> bool:
    """Whether every step gives every trainable parameter a gradient, so DDP can skip its search
    for unused ones: the strategy's steps reach the whole model (plain CLIP) and the model is one of
    open_clip's standard CLIPs with nothing the CLIP loss leaves out. A SigLIP logit bias, CoCa's
    caption decoder or a custom text tower's unused layers would stop DDP at the second step, so
    those keep the search."""
    import open_clip

    return (strategy.uses_every_parameter and type(model) is open_clip.CLIP
            and getattr(model, "logit_bias", None) is None)


class Trainer:
    def __init__(self, config: TrainConfig, train_data: ImageCaptionData, out_dir: str | Path,
                 strategy: Strategy | None = None, evaluate: EpochCallback | None = None,
                 diagnostics: DiagnosticsCallback | None = None):
        self.cfg = config
        self.data = train_data
        self.out = Path(out_dir)
        self.strategy = strategy or ClipStrategy()
        self.evaluate = evaluate
        self.diagnostics = diagnostics

    # ------------------------------------------------------------------ set-up
    def _autocast(self, dev: torch.device) -> Callable[[], Any]:
        p = self.cfg.precision
        if p == "auto":
            p = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = p
        if p == "fp32":
            return lambda: contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        if p == "amp" and dev.type != "cuda":
            raise ConfigError("precision 'amp' (fp16) needs a GPU; use fp32 or bf16 on the CPU")
        return lambda: torch.autocast(dev.type, dtype=dtype)

    def setup(self, dist: DistInfo | None = None) -> None:
        """Build the model, optimizer, schedule and strategy context (``fit`` calls it; tests may too)."""
        cfg = self.cfg
        dist = dist or DistInfo()
        self.dist = dist
        self.model = create_model(cfg.model, checkpoint=cfg.checkpoint, device=dist.device, seed=cfg.seed,
                                  trim_text=cfg.trim_text)
        size = image_size(self.model)
        if tuple(self.data.images.shape[-2:]) != (size, size):
            raise ConfigError(f"images are {tuple(self.data.images.shape[-2:])} but model '{cfg.model}' "
                              f"expects {size}x{size}; load the CSV with image_size={size}")
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)  # 4-D weights only; state dicts are unchanged
        if self.data.lazy and cfg.workers is not None and hasattr(self.data.images, "set_workers"):
            self.data.images.set_workers(cfg.workers)
        self.ddp = None
        step_module: torch.nn.Module = StepModule(self.model)
        if dist.enabled:
            self.ddp = step_module = torch.nn.parallel.DistributedDataParallel(
                step_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                find_unused_parameters=not every_parameter_trains(self.model, self.strategy))
        # ``self.model`` stays the plain open_clip module: checkpoints, the optimizer, the logit-scale
        # clamp and the strategies' eager encoders use it, so no '_orig_mod.' key reaches a checkpoint
        forward_module = self.ddp or self.model
        if cfg.compile:
            forward_module = torch.compile(forward_module)  # the wrapper shares self.model's parameters
        self.tokenizer = get_tokenizer(cfg.model)
        tokens = self.tokenizer(self.data.captions)
        per_step = cfg.batch_size * dist.world_size * cfg.accum_steps
        spe = len(self.data) // per_step
        if spe == 0:
            raise ConfigError(f"{len(self.data)} pairs are fewer than one step of "
                              f"{per_step} (batch x world x accumulation)")
        images = self.data.images
        if dist.device.type == "cuda" and not self.data.lazy and images.numel() < 2 ** 31:
            images = images.to(dist.device)
            tokens = tokens.to(dist.device)
        self.images, self.tokens = images, tokens
        self.ctx = TrainContext(
            model=forward_module, raw_model=self.model, data=self.data, tokens=tokens,
            tokenizer=self.tokenizer, dist=dist, device=dist.device, epochs=cfg.epochs,
            steps_per_epoch=spe, batch_size=cfg.batch_size, seed=cfg.seed, base_lr=cfg.lr,
            autocast=self._autocast(dist.device), channels_last=cfg.channels_last, step_module=step_module)
        self.strategy.bind(self.ctx)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self._params = list(self.model.parameters())  # what gradient clipping reads every step
        self.schedule = self.strategy.schedule(self.ctx, cfg.warmup, cfg.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "amp")

    def _permutation(self, epoch: int, dist: DistInfo) -> torch.Tensor:
        g = torch.Generator().manual_seed(step_seed(self.cfg.seed, "perm", epoch))
        perm = torch.randperm(len(self.data), generator=g)
        per_rank = self.ctx.steps_per_epoch * self.cfg.accum_steps * self.cfg.batch_size
        perm = perm[: per_rank * dist.world_size]
        return perm[dist.rank::dist.world_size]

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx] if self.data.lazy else self.images[idx.to(self.images.device)]

    def _host_batches(self, dist: DistInfo) -> tuple[bool, bool]:
        """(prefetch, pin): decode or gather the next micro-batch in a background thread when the
        images live on the host (on-demand data always; in-memory data that stayed on the host on a
        GPU run), pinned on CUDA so the copy to the GPU is asynchronous. In-memory data on the CPU,
        or already on the GPU, is indexed in place as before."""
        on_host = self.data.lazy or self.images.device.type != dist.device.type
        pin = bool(self.cfg.pin_memory) and dist.device.type == "cuda" and on_host
        return self.data.lazy or pin, pin

    def _host_images(self, idx: torch.Tensor, pin: bool) -> torch.Tensor:
        if not pin:
            return self._images(idx)
        if self.data.lazy and hasattr(self.images, "take"):
            return self.images.take(idx, pin_memory=True)  # decoded straight into pinned memory
        return self._images(idx).pin_memory()

    def _batch(self, idx: torch.Tensor, epoch: int, step: int, micro: int, dist: DistInfo,
               images_u8: torch.Tensor | None = None) -> Batch:
        s = step_seed(self.cfg.seed, epoch, step, micro, dist.rank)
        if images_u8 is None:
            images_u8 = self._images(idx)
        return Batch(pixels=to_pixels(images_u8, dist.device),
                     tokens=self.tokens[idx.to(self.tokens.device)].to(dist.device),
                     captions=[self.data.captions[i] for i in idx.tolist()], indices=idx,
                     generator=torch.Generator().manual_seed(s), rng=random.Random(s))

    # ------------------------------------------------------------------ checkpoints
    def _save(self, epoch: int, step: int) -> None:
        cdir = self.out / "checkpoints"
        folder = cdir / f"epoch_{epoch + 1:03d}"
        state = {"state_format": STATE_FORMAT, "epoch": epoch + 1, "step": step, "model": self.cfg.model,
                 "strategy": self.strategy.name, "strategy_state": self.strategy.state_json(),
                 "scaler": self.scaler.state_dict(), "history": self._history,
                 "clipguard_version": clipguard.__version__}
        ckpt.save_checkpoint(folder, self.model, state=state, optimizer=self.optimizer,
                             extra_tensors={"strategy": self.strategy.state_tensors()}, model_name=self.cfg.model)
        ckpt.update_link(cdir, folder)
        ckpt.prune(cdir, self.cfg.keep_checkpoints)

    def _resume(self, resume: str) -> int:
        cdir = self.out / "checkpoints"
        folder = ckpt.resolve_latest(cdir) if resume == "latest" else Path(resume)
        if folder is None:
            return 0
        if not folder.is_dir():
            raise ConfigError(f"--resume {resume}: {folder} is not a checkpoint folder")
        state = ckpt.read_state(folder)
        if state.get("model") != self.cfg.model or state.get("strategy") != self.strategy.name:
            raise ConfigError(f"{folder}: checkpoint is {state.get('model')}/{state.get('strategy')}, "
                              f"run is {self.cfg.model}/{self.strategy.name}")
        ckpt.load_weights(self.model, folder)
        done = epochs_done(state)
        if state.get("optimizer") is not None:
            ckpt.optimizer_from_tensors(self.optimizer, ckpt.load_tensors(folder, ckpt.OPTIMIZER_TENSORS),
                                        state["optimizer"])
        elif done < self.cfg.epochs:  # a finished run's state without it (the bench drops it) needs none
            raise ConfigError(f"{folder}: the checkpoint has no optimizer state, so training cannot continue "
                              f"from it (epoch {done} of {self.cfg.epochs}); its weights still load (evaluate, "
                              f"finetune --checkpoint)")
        if self.cfg.channels_last:
            _match_param_layout(self.optimizer)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state(ckpt.load_tensors(folder, "strategy"), state.get("strategy_state", {}))
        # the checkpoint carries the history of finished epochs: results.jsonl is rebuilt from it,
        # so a kill between the checkpoint and the results line loses nothing and adds no duplicate
        hist = state.get("history")
        if hist is None:
            hist = [r for r in read_jsonl(self.out / "results.jsonl") if r.get("epoch", 0) <= done]
        self._history = list(hist)
        if self.dist.is_main:
            write_text(self.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in self._history))
        return done

    def run_settings(self) -> dict[str, Any]:
        """What decides the weights: a resume must match the run it continues."""
        return {"defense": self.strategy.name, "options": self.strategy.opt.identity(),
                "train": self.cfg.result_settings()}

    def _write_params(self, start: int) -> None:
        params_path = self.out / "params.json"
        run = json.loads(json.dumps(self.run_settings(), default=str))
        if start > 0 and params_path.is_file():
            old = (read_json_object(params_path, "params.json").get("run") or {})
            diff = _diff_keys(old, run) if old else []
            if diff:
                raise ConfigError(f"{self.out}: --resume with settings that differ from the run it continues "
                                  f"({', '.join(diff)}); resume with the same settings, or start a new --out")
            return
        write_json(params_path, {
            "run": run, "train": self.cfg.to_dict(), "defense": self.strategy.name,
            "strategy": self.strategy.config(),
            "data": {"source": self.data.source, "pairs": len(self.data), "skipped_rows": self.data.skipped},
            "world_size": self.dist.world_size, "precision": self.precision,
            "steps_per_epoch": self.ctx.steps_per_epoch, "clipguard_version": clipguard.__version__})

    # ------------------------------------------------------------------ loop
    def fit(self, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Train (or continue with ``resume='latest'``); ``overwrite`` replaces a run already in ``out``."""
        cfg = self.cfg
        run_dir.check_out_path(self.out)
        dist = init_distributed(cfg.device)
        lock = run_dir.RunLock(self.out) if dist.is_main else contextlib.nullcontext()
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        with lock:
            if dist.is_main:
                run_dir.prepare(self.out, resume=resume, overwrite=overwrite)
            barrier(dist)
            log = run_dir.RunLog(self.out, enabled=dist.is_main)
            self.setup(dist)
            if dist.is_main:
                ckpt.clean_orphans(self.out / "checkpoints")  # temp folders of a save that was killed
            self._history = []
            start = self._resume(resume) if resume else 0
            if dist.is_main:
                self._write_params(start)
            log.write(f"{'resume at' if start else 'start'} epoch {start + 1}/{cfg.epochs}: {self.strategy.name}, "
                      f"{cfg.model}, {len(self.data)} pairs")
            tb = self._tensorboard(dist)
            last: dict[str, Any] = {}
            end = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start + cfg.stop_after)
            try:
                for epoch in range(start, end):
                    last = self._epoch(epoch, dist, tb, log)
            except BaseException as e:
                log.write(f"failed: {type(e).__name__}: {e}")
                raise
            finally:
                if tb is not None:
                    tb.close()
            log.write(f"{'finished' if end == cfg.epochs else 'stopped'} after epoch {end}/{cfg.epochs}")
            barrier(dist)
        return last

    def _epoch(self, epoch: int, dist: DistInfo, tb, log: run_dir.RunLog | None = None) -> dict[str, Any]:
        record = self._begin_epoch(epoch, dist)
        record.update(self._train_steps(epoch, dist))
        t_hook = time.perf_counter()
        record.update(self.strategy.on_epoch_end(epoch))  # e.g. RoCLIP's pattern veto
        record["hook_seconds"] = round(record["hook_seconds"] + time.perf_counter() - t_hook, 3)
        cfg = self.cfg
        if self.evaluate is not None and dist.is_main and (
                (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            record.update(self.evaluate(self.model, epoch))
        self._end_epoch(epoch, dist, record, tb, log)
        return record

    def _begin_epoch(self, epoch: int, dist: DistInfo) -> dict[str, Any]:
        """The strategy's epoch-start hook (e.g. SafeCLIP's split) and the reporting diagnostics."""
        self.ctx.epoch = epoch
        record: dict[str, Any] = {"epoch": epoch + 1}
        t_hook = time.perf_counter()
        record.update(self.strategy.on_epoch_start(epoch))
        record["hook_seconds"] = round(time.perf_counter() - t_hook, 3)
        if self.diagnostics is not None and dist.is_main:
            record.update(self.diagnostics(self.strategy, epoch, self.out))
        return record

    def _train_steps(self, epoch: int, dist: DistInfo) -> dict[str, Any]:
        """One pass over this rank's shard: the loss, backward, clip, step; returns the epoch's means."""
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        perm = self._permutation(epoch, dist)
        spe, b, acc = ctx.steps_per_epoch, cfg.batch_size, cfg.accum_steps
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        # host-side data (on disk, or in host memory on a GPU run): the next micro-batch is decoded or
        # gathered (and pinned) in the background while this one trains
        use_prefetch, pin = self._host_batches(dist)
        prefetch = ThreadPoolExecutor(1) if use_prefetch else None
        slices = [perm[i * b:(i + 1) * b] for i in range(spe * acc)]
        pending = prefetch.submit(self._host_images, slices[0], pin) if prefetch else None
        bar = tqdm(range(spe), desc=f"epoch {epoch + 1}/{cfg.epochs} [{self.strategy.name}]",
                   disable=cfg.quiet or not dist.is_main, leave=False, dynamic_ncols=True,
                   position=cfg.bar_position)
        try:
            for step in bar:
                gstep = epoch * spe + step
                ctx.step = gstep
                lr = self.schedule.lr_at(gstep)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                for micro in range(acc):
                    k = step * acc + micro
                    images_u8 = None
                    if pending is not None:
                        images_u8 = pending.result()
                        pending = (prefetch.submit(self._host_images, slices[k + 1], pin)
                                   if k + 1 < len(slices) else None)
                    batch = self._batch(slices[k], epoch, step, micro, dist, images_u8)
                    sync = self.ddp is not None and micro < acc - 1
                    with self.ddp.no_sync() if sync else contextlib.nullcontext():
                        loss, logs = self.strategy.loss(batch)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"loss is {float(loss)} at epoch {epoch + 1} step {step}")
                        self.scaler.scale(loss / acc).backward()
                    for key, v in {"loss": float(loss.detach()), **logs}.items():
                        sums[key] = sums.get(key, 0.0) + v / acc
                if cfg.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    clip_grad_norm(self._params, cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
        finally:
            if prefetch is not None:
                prefetch.shutdown()
        seconds = time.perf_counter() - t0
        keys = sorted(sums)
        tot = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), dist)
        out: dict[str, Any] = {k: round(float(v) / (spe * dist.world_size), 6) for k, v in zip(keys, tot)}
        out.update({"lr": self.schedule.lr_at(epoch * spe + spe - 1), "seconds": round(seconds, 3),
                    "images_per_s": round(spe * b * acc * dist.world_size / seconds, 1),
                    "logit_scale": round(math.exp(float(self.model.logit_scale.detach())), 3)})
        return out

    def _end_epoch(self, epoch: int, dist: DistInfo, record: dict[str, Any], tb,
                   log: run_dir.RunLog | None) -> None:
        """Checkpoint (with the history inside), then the results line, TensorBoard and out.log."""
        if dist.is_main:
            entry = json.loads(json.dumps(round_floats(record), default=str))  # as results.jsonl holds it
            self._history.append(entry)
            self._save(epoch, (epoch + 1) * self.ctx.steps_per_epoch)
            append_jsonl(self.out / "results.jsonl", entry)
            if tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)):
                        tb.add_scalar(k, v, epoch + 1)
            shown = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            if not self.cfg.quiet:
                tqdm.write(line)
            if log is not None:
                log.write(line)
        barrier(dist)

    def _tensorboard(self, dist: DistInfo):
        if not self.cfg.tensorboard or not dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("--tensorboard needs `pip install clipguard[tensorboard]`") from e
        return SummaryWriter(str(self.out / "tensorboard"))


def _match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer moments their parameter's memory layout (checkpoints store them
    contiguous; a channels_last run's fused AdamW wants them laid out like the weights)."""
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def epochs_done(state: dict[str, Any]) -> int:
    """How many epochs a checkpoint's state.json says are finished (either format)."""
    epoch = int(state.get("epoch", -1))
    return epoch if int(state.get("state_format", 1)) >= 2 else epoch + 1


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]
