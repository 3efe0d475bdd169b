"""The one training loop. Defences plug in as strategies; this file never learns their names.

DDP-ready (torchrun, gloo or NCCL), AMP on GPUs, gradient accumulation, gradient clipping,
logit-scale clamp, an atomic checkpoint every epoch and an exact ``resume``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

import clipguard
from clipguard.data.csv_dataset import ImageCaptionData
from clipguard.errors import ConfigError
from clipguard.io import append_jsonl, read_jsonl, write_json, write_text
from clipguard.models import checkpoint as ckpt
from clipguard.models.factory import create_model, get_tokenizer, image_size
from clipguard.training.context import Batch, TrainContext, step_seed, to_pixels
from clipguard.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from clipguard.training.losses import MAX_LOGIT_SCALE
from clipguard.training.optim import make_optimizer
from clipguard.training.strategy import ClipStrategy, Strategy

log = logging.getLogger("clipguard")

EpochCallback = Callable[[torch.nn.Module, int], dict[str, Any]]
DiagnosticsCallback = Callable[[Strategy, int, Path], dict[str, Any]]


@dataclass
class TrainConfig:
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
    precision: str = "auto"  # auto | fp32 | amp (fp16 + scaler) | bf16
    device: str = "auto"
    checkpoint: str | None = None  # initial weights (fine-tuning starts here, fresh optimizer)
    keep_checkpoints: int = 2
    stop_after: int | None = None  # run at most this many epochs now (time-sliced jobs)
    eval_every: int = 1
    tensorboard: bool = False
    quiet: bool = False
    bar_position: int | None = None  # terminal line of the epoch bar (bench workers: one each)
    extra: dict[str, Any] = field(default_factory=dict)


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

    def _build(self, dist: DistInfo) -> None:
        cfg = self.cfg
        self.model = create_model(cfg.model, checkpoint=cfg.checkpoint, device=dist.device, seed=cfg.seed)
        size = image_size(self.model)
        if tuple(self.data.images.shape[-2:]) != (size, size):
            raise ConfigError(f"images are {tuple(self.data.images.shape[-2:])} but model '{cfg.model}' "
                              f"expects {size}x{size}; load the CSV with image_size={size}")
        self.ddp = None
        if dist.enabled:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                find_unused_parameters=True)
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
            model=self.ddp or self.model, raw_model=self.model, data=self.data, tokens=tokens,
            tokenizer=self.tokenizer, dist=dist, device=dist.device, epochs=cfg.epochs,
            steps_per_epoch=spe, batch_size=cfg.batch_size, seed=cfg.seed, base_lr=cfg.lr,
            autocast=self._autocast(dist.device))
        self.strategy.bind(self.ctx)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
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
        state = {"epoch": epoch, "step": step, "model": self.cfg.model, "strategy": self.strategy.name,
                 "strategy_state": self.strategy.state_json(), "scaler": self.scaler.state_dict(),
                 "clipguard_version": clipguard.__version__}
        ckpt.save_checkpoint(folder, self.model, state=state, optimizer=self.optimizer,
                             extra_tensors={"strategy": self.strategy.state_tensors()})
        ckpt.update_link(cdir, folder)
        ckpt.prune(cdir, self.cfg.keep_checkpoints)

    def _resume(self, resume: str) -> int:
        cdir = self.out / "checkpoints"
        folder = ckpt.resolve_latest(cdir) if resume == "latest" else Path(resume)
        if folder is None:
            return 0
        state = ckpt.read_state(folder)
        if state.get("model") != self.cfg.model or state.get("strategy") != self.strategy.name:
            raise ConfigError(f"{folder}: checkpoint is {state.get('model')}/{state.get('strategy')}, "
                              f"run is {self.cfg.model}/{self.strategy.name}")
        ckpt.load_weights(self.model, folder)
        ckpt.optimizer_from_tensors(self.optimizer, ckpt.load_tensors(folder, "optimizer"),
                                    state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state(ckpt.load_tensors(folder, "strategy"), state.get("strategy_state", {}))
        done = int(state["epoch"]) + 1
        # keep the history of finished epochs only, so a re-run never duplicates lines
        hist = [r for r in read_jsonl(self.out / "results.jsonl") if r.get("epoch", 0) <= done]
        write_text(self.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in hist))
        return done

    # ------------------------------------------------------------------ loop
    def fit(self, resume: str | None = None) -> dict[str, Any]:
        cfg = self.cfg
        dist = init_distributed(cfg.device)
        self._build(dist)
        start = self._resume(resume) if resume else 0
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "params.json", {
                "train": asdict(cfg), "defense": self.strategy.name, "strategy": self.strategy.config(),
                "data": {"source": self.data.source, "pairs": len(self.data), "skipped_rows": self.data.skipped},
                "world_size": dist.world_size, "precision": self.precision,
                "steps_per_epoch": self.ctx.steps_per_epoch, "clipguard_version": clipguard.__version__})
        tb = self._tensorboard(dist)
        last: dict[str, Any] = {}
        end = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start + cfg.stop_after)
        for epoch in range(start, end):
            last = self._epoch(epoch, dist, tb)
        if tb is not None:
            tb.close()
        barrier(dist)
        return last

    def _epoch(self, epoch: int, dist: DistInfo, tb) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        ctx.epoch = epoch
        record: dict[str, Any] = {"epoch": epoch + 1}
        t_hook = time.perf_counter()
        record.update(self.strategy.on_epoch_start(epoch))
        record["hook_seconds"] = round(time.perf_counter() - t_hook, 3)
        if self.diagnostics is not None and dist.is_main:
            record.update(self.diagnostics(self.strategy, epoch, self.out))
        self.model.train()
        perm = self._permutation(epoch, dist)
        spe, b, acc = ctx.steps_per_epoch, cfg.batch_size, cfg.accum_steps
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        # lazy (on-disk) data: decode the next micro-batch in the background while this one trains
        prefetch = ThreadPoolExecutor(1) if self.data.lazy else None
        slices = [perm[i * b:(i + 1) * b] for i in range(spe * acc)]
        pending = prefetch.submit(self._images, slices[0]) if prefetch else None
        bar = tqdm(range(spe), desc=f"epoch {epoch + 1}/{cfg.epochs} [{self.strategy.name}]",
                   disable=cfg.quiet or not dist.is_main, leave=False, dynamic_ncols=True,
                   position=cfg.bar_position)
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
                    pending = prefetch.submit(self._images, slices[k + 1]) if k + 1 < len(slices) else None
                batch = self._batch(slices[k], epoch, step, micro, dist, images_u8)
                sync = self.ddp is not None and micro < acc - 1
                with self.ddp.no_sync() if sync else contextlib.nullcontext():
                    loss, logs = self.strategy.loss(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {float(loss)} at epoch {epoch + 1} step {step}")
                    self.scaler.scale(loss / acc).backward()
                for k, v in {"loss": float(loss.detach()), **logs}.items():
                    sums[k] = sums.get(k, 0.0) + v / acc
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
        seconds = time.perf_counter() - t0
        if prefetch is not None:
            prefetch.shutdown()
        keys = sorted(sums)
        tot = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), dist)
        record.update({k: round(float(v) / (spe * dist.world_size), 6) for k, v in zip(keys, tot)})
        record.update({"lr": self.schedule.lr_at(epoch * spe + spe - 1), "seconds": round(seconds, 3),
                       "images_per_s": round(spe * b * acc * dist.world_size / seconds, 1),
                       "logit_scale": round(math.exp(float(self.model.logit_scale.detach())), 3)})
        record.update(self.strategy.on_epoch_end(epoch))
        if self.evaluate is not None and dist.is_main and (
                (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            record.update(self.evaluate(self.model, epoch))
        if dist.is_main:
            self._save(epoch, (epoch + 1) * spe)
            append_jsonl(self.out / "results.jsonl", record)
            if tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)):
                        tb.add_scalar(k, v, epoch + 1)
            if not cfg.quiet:
                shown = {k: v for k, v in record.items() if isinstance(v, (int, float))}
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in shown.items()))
        barrier(dist)
        return record

    def _tensorboard(self, dist: DistInfo):
        if not self.cfg.tensorboard or not dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("--tensorboard needs `pip install clipguard[tensorboard]`") from e
        return SummaryWriter(str(self.out / "tensorboard"))
