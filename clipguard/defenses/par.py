"""PAR, Perturb and Recover (Singh, Croce, Hein, arXiv:2412.00727): fine-tune a possibly poisoned
model while pushing its embeddings away from those of the model it started from.

Why it helps: a backdoor lives in the poisoned model's embedding geometry (trigger -> target). The
CLIP loss on clean pairs *recovers* clean alignment, while the push term *perturbs* every embedding
away from where the poisoned model put it, so the fine-tuned model cannot just sit in the poisoned
solution. Once an embedding has moved far enough (beyond ``tau``) the push switches off and only
the CLIP loss is left.

Per step, on an augmented image x~ and its caption t (embeddings L2-normalised):

    P_img = mean_i ||f(x~_i) - f0(x~_i)||^2        (squared L2 over dimensions, mean over the batch)
    P_txt = mean_i ||f(t_i)  - f0(t_i)||^2
    L     = CLIP(f(x~), f(t)) - push_weight * 1/2 [ P_img * 1(P_img <= tau) + P_txt * 1(P_txt <= tau) ]

(with ``clip_on: originals`` the CLIP term sees the original images x instead of x~, while the push
still acts on the views).

f0 is the model the run started from, kept frozen: a copy made in ``bind`` (which the trainer calls
once the model exists and *before* ``--resume`` loads the run's own weights, so a resumed run
pushes away from the same starting weights), with requires_grad off, in eval mode, on the model's
device. It is an attribute of this strategy, not a submodule of the trained model, so it is never
in a checkpoint. A fingerprint of its weights goes into the checkpoint's state, and a resume whose
start weights differ is refused.

A P term above tau is replaced by an exact zero (``torch.where``), so its gradient is zero too. As
in the authors' code, P is a mean over the *global* batch: under DDP the per-sample distances are
gathered (gradient on the local slice) and scaled by the world size like the CLIP loss, so the
threshold decision and the update are those of one process holding the whole batch.

Differences from the authors' code (nmndeep/PerturbAndRecover, losses.py / train.py), on purpose:
the model's logit scale is trained as in every clipguard strategy (theirs passes ``logit_scale``
as a detached float). Their view (additive noise and a small erased square on the centre-cropped
image) is ``image_augment: noise-erase`` and their learning-rate schedule (from 10x the lr down to
it over the first half of the run, then a cosine) is ``lr_schedule: paper``; neither is the
default on the small models (docs/finetuning.md, PAR).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from clipguard.data.augment import Views, noise_erase
from clipguard.defenses import DEFENSES
from clipguard.errors import ConfigError
from clipguard.options import Options, require
from clipguard.tensors import normalize
from clipguard.training.context import Batch, TrainContext
from clipguard.training.distributed import gather_with_local_grad
from clipguard.training.losses import clip_loss, global_loss
from clipguard.training.schedule import Schedule, warmup_cosine
from clipguard.training.strategy import Strategy

MAX_SQ_DIST = 4.0  # the squared distance of two unit vectors is at most 4: a tau >= 4 never stops the push


@dataclass
class ParOptions(Options):
    """PAR's threshold, push weight and views."""

    kind: ClassVar[str] = "defense 'par'"
    # 2.15: the default of --loss-thresh in the authors' train.py (nmndeep/PerturbAndRecover), which
    # their training script trigger.sh does not override. On unit vectors ||a - b||^2 = 2 - 2 cos(a, b),
    # so the push stops once the mean cosine to the starting model's embedding falls below about -0.075.
    tau: float = 2.15
    push_weight: float = 1.0            # L = CLIP - push_weight * 1/2 (P_img + P_txt); 0: plain CLIP
    # noise-erase, the authors' own view (clipguard.data.augment.noise_erase), with their schedule
    # below: chosen on validation (configs/finetune-select.yaml, round 7: on seeds no earlier round
    # had seen no PAR candidate stayed within 3 points, and this was the most accurate); none, the
    # default of rounds 3-6, cost 5.4 points there; simclr removes more, at 7-11 points
    image_augment: Literal["simclr", "crop-flip", "noise-erase", "none"] = "noise-erase"
    crop_scale_min: float = 0.08        # smallest crop of the random resized crop (simclr, crop-flip)
    push_text: bool = True              # False: drop the P_txt term (the text tower is only trained by CLIP)
    # what the CLIP (recover) term sees: the augmented views, as in the authors' code, or the
    # original images (the push still acts on the views; one forward encodes both, B more images)
    clip_on: Literal["views", "originals"] = field(default="views", metadata={"neutral": "views"})
    # the learning rate over the run: "trainer", the run's own (a warm-up from zero, then the cosine);
    # "paper", the authors' train.py: it starts at lr_start_factor x lr and falls linearly to lr
    # over the first half of the steps (their warm-up from --lr-start 3e-5 to --lr 3e-6 over half of
    # the epochs), then the cosine to min_lr. The perturbation gets its largest steps first. The
    # default since round 7 (with noise-erase, above); "trainer" was the default before
    lr_schedule: Literal["trainer", "paper"] = field(default="paper", metadata={"neutral": "trainer"})
    lr_start_factor: float = field(default=10.0, metadata={"neutral": 10.0})

    def validate(self) -> None:
        require(self.tau >= 0, f"tau must be >= 0, got {self.tau} (0: the push never acts, plain CLIP)")
        require(self.push_weight >= 0, f"push_weight must be >= 0, got {self.push_weight}")
        require(0.0 < self.crop_scale_min <= 1.0, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        require(self.lr_start_factor > 0, f"lr_start_factor must be > 0, got {self.lr_start_factor}")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes), the same on every device."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


@DEFENSES.register("par")
class Par(Strategy):
    """CLIP minus a thresholded push away from the frozen starting model; push_weight = 0 or
    tau = 0 is exactly the CLIP loss on the same views (and no frozen copy is made)."""

    name = "par"
    options_class = ParOptions

    def __init__(self, options: ParOptions | None = None) -> None:
        super().__init__(options)
        self._views_of = Views(crop_scale_min=self.opt.crop_scale_min)
        self.frozen: torch.nn.Module | None = None
        self._start_fp: str | None = None

    @property
    def pushes(self) -> bool:
        """Whether the push term can ever be non-zero (P >= 0, so tau = 0 switches it off)."""
        return self.opt.push_weight > 0 and self.opt.tau > 0

    def bind(self, ctx: TrainContext) -> None:
        super().bind(ctx)
        self.frozen, self._start_fp = None, None
        if not self.pushes:
            return
        # the trainer binds right after building the model from the run's start weights
        # (TrainConfig.checkpoint, which finetune_start resolved) and before --resume loads the
        # run's own checkpoint: this copy is the starting model on a fresh and a resumed run alike
        frozen = copy.deepcopy(ctx.raw_model)
        frozen.requires_grad_(False)
        frozen.eval()
        self.frozen = frozen
        self._start_fp = weights_fingerprint(frozen)

    # ---- state: no tensors (the frozen copy is rebuilt from the start weights), one fingerprint
    def state_json(self) -> dict[str, Any]:
        return {"start_weights": self._start_fp} if self._start_fp else {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        saved = meta.get("start_weights")
        if saved and self._start_fp and saved != self._start_fp:
            raise ConfigError("--resume: the fine-tuning start weights (--checkpoint) are not the ones this run "
                              f"started from (fingerprint {self._start_fp} != {saved}); PAR pushes away from the "
                              "starting model, so resume with the original start weights or start a new --out")

    def schedule(self, ctx: TrainContext, warmup: int, min_lr: float) -> Schedule:
        """The run's schedule, or the authors' (``lr_schedule: paper``): from lr_start_factor x lr
        down to lr over the first half of the steps, then the cosine; the run's warm-up is unused."""
        if self.opt.lr_schedule == "trainer":
            return super().schedule(ctx, warmup, min_lr)
        total = ctx.epochs * ctx.steps_per_epoch
        return warmup_cosine(total, ctx.base_lr, total // 2, min_lr, start_lr=self.opt.lr_start_factor * ctx.base_lr)

    def describe_schedule(self, lr: float, warmup: int) -> str:
        if self.opt.lr_schedule == "trainer":
            return super().describe_schedule(lr, warmup)
        return f"lr {self.opt.lr_start_factor * lr:g} falling to {lr:g} over half the run, then the cosine (PAR's schedule)"

    # ---- the loss -----------------------------------------------------------------------------
    def _augment(self, batch: Batch) -> torch.Tensor:
        if self.opt.image_augment == "none":
            return batch.pixels
        if self.opt.image_augment == "noise-erase":
            return noise_erase(batch.pixels, batch.generator)
        return self._views_of.images(batch.pixels, batch.generator,
                                     geometric_only=self.opt.image_augment == "crop-flip")

    @torch.no_grad()
    def _frozen_features(self, pixels: torch.Tensor, tokens: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """f0's normalised embeddings of the step's views (the same inputs the trained model sees)."""
        assert self.frozen is not None
        with self.ctx.autocast():
            out = self.frozen(normalize(pixels), tokens)
        img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else (out[0], out[1])
        return img.float(), (txt.float() if txt is not None else None)

    def _mean_sq_dist(self, f: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """mean over the global batch of ||f - f0||^2 (gradient through this rank's rows)."""
        d = (f - f0).pow(2).sum(dim=1)
        return gather_with_local_grad(d, self.ctx.dist).mean()

    def _thresholded(self, p: torch.Tensor) -> torch.Tensor:
        """p while p <= tau, else an exact 0 (and a zero gradient)."""
        return torch.where(p > self.opt.tau, torch.zeros_like(p), p)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = self._augment(batch)
        if self.opt.clip_on == "originals" and self.opt.image_augment != "none":
            both, txt, scale = self.ctx.forward(torch.cat([batch.pixels, pixels]), batch.tokens)
            n = batch.pixels.shape[0]
            l_clip = clip_loss(both[:n], txt, scale, self.ctx.dist)
            img = both[n:]
        else:
            img, txt, scale = self.ctx.forward(pixels, batch.tokens)
            l_clip = clip_loss(img, txt, scale, self.ctx.dist)
        logs: dict[str, Any] = {"clip_loss": float(l_clip.detach())}
        if not self.pushes:
            return l_clip, logs
        img0, txt0 = self._frozen_features(pixels, batch.tokens if self.opt.push_text else None)
        p_img = self._mean_sq_dist(img, img0)
        push = self._thresholded(p_img)
        logs.update({"p_img": float(p_img.detach()), "p_img_active": float(p_img.detach() <= self.opt.tau)})
        if txt0 is not None:
            p_txt = self._mean_sq_dist(txt, txt0)
            push = push + self._thresholded(p_txt)
            logs.update({"p_txt": float(p_txt.detach()), "p_txt_active": float(p_txt.detach() <= self.opt.tau)})
        # the global batch's value, with the gradient scaled like clip_loss's for DDP's average
        total = l_clip - self.opt.push_weight * 0.5 * global_loss(push, self.ctx.dist)
        return total, logs
