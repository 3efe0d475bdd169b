"""CleanerCLIP (2024): CleanCLIP plus factual / counterfactual sub-caption alignment.

Why: CleanCLIP's EDA views barely change a caption's meaning, so a trigger tied to clean
target features (BadCLIP) survives. For a random subset of samples, CleanerCLIP pulls each image
towards a factual sub-caption T+ (core nouns and verb kept) and away from counterfactual ones
T- (adjectives, verb or nouns replaced), which re-draws fine-grained text boundaries the
trigger relies on. The paper's formulas are not recoverable from its text; this is the form we use:

  L_img_i = -log e^{<I_i,T+_i>/tp} / (e^{<I_i,T+_i>/tp} + sum_j e^{<I_i,T-_j>/tn})
  L_txt_i = -log e^{<T+_i,I_i>/tp} / (e^{<T+_i,I_i>/tp} + sum_{j != i} e^{<T+_i,I_j>/tn})
  L_fc = 1/2 (mean L_img + mean L_txt);  total = l1 CLIP + l2 in-modal + l3 L_fc

The subset: ``fc_samples`` rows of the whole dataset per epoch (a count, or a fraction when
< 1), drawn from a generator seeded by (seed, epoch) and parsed into factual sub-captions at the
start of the epoch (rows whose caption has no noun are skipped and counted). Every step then draws
its OWN mini-batch of ``fc_batch`` subset rows (default: the training batch size), reads their
images with ``data.images[idx]`` (in-memory or lazy data alike), draws their counterfactuals and
sends images, T+ and T- through the step's one forward pass. So L_fc has its negatives on every
step, whatever the ratio of subset to data (the paper's 1,000 of 500k pairs would put 0.13
subset rows in a batch of 64). The draw and the counterfactuals come from a generator seeded by
the step's batch seed (seed, epoch, step, micro-batch, rank): a resumed run replays them.

Under DDP every rank builds the same subset and draws from its own share of it (positions
rank, rank + world, ...), the same number of rows on every rank, so the shares are disjoint;
the subset features are gathered across ranks like the CLIP loss's (gradient through the local
slice). ``fc_per_step`` instead takes that many rows of each local batch (no gather). The loss
never sees any poison label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from clipguard.data.counterfactuals import CounterfactualMaker
from clipguard.data.subcaptions import SubCaption
from clipguard.defenses import DEFENSES
from clipguard.defenses.cleanclip import CleanClip, CleanClipOptions
from clipguard.options import require
from clipguard.training.context import Batch, step_seed, to_pixels
from clipguard.training.distributed import DistInfo, gather_with_local_grad

SCAN_FACTOR = 4  # at most this many times fc_samples captions are parsed to fill the subset


def factual_counterfactual_terms(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                                 tau_pos: float, tau_neg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean L_img, mean L_txt) over k subset samples; img, pos (T+), neg (T-) are (k, D)
    L2-normalised features. One sample has no other image: its text term is exactly zero."""
    k = img.shape[0]
    if k == 0:
        zero = img.sum() * 0.0 + pos.sum() * 0.0 + neg.sum() * 0.0
        return zero, zero
    p = (img * pos).sum(-1, keepdim=True) / tau_pos                    # (k, 1)
    l_img = -F.log_softmax(torch.cat([p, img @ neg.t() / tau_neg], 1), 1)[:, 0]
    others = pos @ img.t() / tau_neg                                      # (k, k)
    others = others.masked_fill(torch.eye(k, dtype=torch.bool, device=img.device), float("-inf"))
    l_txt = -F.log_softmax(torch.cat([p, others], 1), 1)[:, 0]
    return l_img.mean(), l_txt.mean()


def factual_counterfactual_loss(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                                tau_pos: float, tau_neg: float) -> torch.Tensor:
    """L_fc over k subset samples: img, pos (T+), neg (T-) are (k, D) L2-normalised features."""
    l_img, l_txt = factual_counterfactual_terms(img, pos, neg, tau_pos, tau_neg)
    return 0.5 * (l_img + l_txt)


def subset_fc_loss(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau_pos: float, tau_neg: float,
                   dist: DistInfo | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_fc, mean L_img, mean L_txt) of the subset rows of ALL ranks; each rank passes its own
    (k, D) rows, the same k everywhere.

    The features are gathered with gradient through the local slice. L_fc's value is the global
    one and its gradient world_size times that, so DDP's average over ranks gives exactly the
    gradient of one process holding every rank's rows (as ``clip_loss`` does).
    """
    dist = dist or DistInfo()
    l_img, l_txt = factual_counterfactual_terms(gather_with_local_grad(img, dist), gather_with_local_grad(pos, dist),
                                                gather_with_local_grad(neg, dist), tau_pos, tau_neg)
    l_fc = 0.5 * (l_img + l_txt)
    w = dist.world_size
    return (l_fc if w == 1 else l_fc * w - l_fc.detach() * (w - 1)), l_img, l_txt


@dataclass
class CleanerClipOptions(CleanClipOptions):
    """CleanCLIP's options plus L_fc's weight, temperatures, subset and counterfactual rules."""

    kind: ClassVar[str] = "defense 'cleanerclip'"
    lambda3: float = 1.0              # weight of L_fc (0 with lambda2 = 0: plain CLIP)
    tau_pos: float = 0.3
    tau_neg: float = 0.3
    fc_samples: float = 1000          # the epoch's subset: a count of rows, or a fraction when < 1
    fc_batch: int | None = None       # subset rows per step and rank (None: the training batch size)
    fc_per_step: int | None = None    # instead: this many rows of every local batch
    counterfactuals: Literal["paper", "slot"] = "paper"  # paper: adjectives / verb / nouns from word lists
    word_list_size: int = 3000        # words per part of speech in the paper mode's lists
    slot_kinds: list[str] = field(default_factory=lambda: ["adj", "verb", "noun"])

    def validate(self) -> None:
        super().validate()
        require(self.lambda3 >= 0, f"lambda3 must be >= 0, got {self.lambda3}")
        require(self.tau_pos > 0 and self.tau_neg > 0, f"tau_pos and tau_neg must be > 0, got {self.tau_pos}, "
                f"{self.tau_neg}")
        require(self.fc_samples >= 0, f"fc_samples must be >= 0, got {self.fc_samples}")
        require(self.fc_samples < 1 or float(self.fc_samples).is_integer(),
                f"fc_samples must be a whole count, or a fraction below 1; got {self.fc_samples}")
        require(self.fc_batch is None or self.fc_batch >= 1, f"fc_batch must be >= 1, got {self.fc_batch}")
        require(self.fc_per_step is None or self.fc_per_step >= 0, f"fc_per_step must be >= 0, got {self.fc_per_step}")
        require(self.word_list_size >= 1, f"word_list_size must be >= 1, got {self.word_list_size}")
        bad = sorted(set(self.slot_kinds) - {"adj", "verb", "noun"})
        require(not bad and bool(self.slot_kinds), f"slot_kinds must be a non-empty list of adj, verb, noun; got "
                f"{self.slot_kinds}")


@DEFENSES.register("cleanerclip")
class CleanerClip(CleanClip):
    """CleanCLIP + lambda3 * L_fc on a per-step subset mini-batch; lambda2 = lambda3 = 0 is plain CLIP."""

    name = "cleanerclip"
    options_class = CleanerClipOptions

    def __init__(self, options: CleanerClipOptions | None = None) -> None:
        super().__init__(options)
        self._cf = CounterfactualMaker(self.opt.counterfactuals, kinds=tuple(self.opt.slot_kinds),
                                       list_size=self.opt.word_list_size)
        self._subset = torch.empty(0, dtype=torch.long)   # dataset rows of the epoch's subset
        self._facts: list[SubCaption] = []                # their factual sub-captions
        self._local = 0                                    # subset rows per step on this rank

    # ---- the epoch's subset ----------------------------------------------------------------
    def _subset_size(self) -> int:
        n = len(self.ctx.data)
        k = int(round(self.opt.fc_samples * n)) if 0 < self.opt.fc_samples < 1 else int(self.opt.fc_samples)
        return min(k, n)

    def _in_batch(self) -> bool:
        return self.opt.fc_per_step is not None

    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        self._subset, self._facts, self._local = torch.empty(0, dtype=torch.long), [], 0
        if self.opt.lambda3 == 0 or self._in_batch():
            return {}
        n, want = len(self.ctx.data), self._subset_size()
        g = torch.Generator().manual_seed(step_seed(self.ctx.seed, "cleanerclip-subset", epoch))
        order = torch.randperm(n, generator=g)[: SCAN_FACTOR * want].tolist()
        rows, facts, unparsed = [], [], 0
        for i in order:
            if len(rows) == want:
                break
            fact = self._cf.factual(self.ctx.data.captions[i])
            if fact is None:
                unparsed += 1   # no noun: the row takes part in CLIP + in-modal only
                continue
            rows.append(i)
            facts.append(fact)
        self._subset, self._facts = torch.tensor(rows, dtype=torch.long), facts
        world = self.ctx.dist.world_size
        self._local = min(self.opt.fc_batch or self.ctx.batch_size, len(rows) // world)
        return {"fc_subset": len(rows), "fc_unparsed": unparsed, "fc_batch": self._local * world}

    def _draw(self, batch: Batch) -> tuple[torch.Tensor, list[SubCaption], random.Random]:
        """This step's subset rows on this rank (dataset indices), their facts and the rng for
        their counterfactuals, all from the step's batch seed."""
        seed = step_seed(batch.generator.initial_seed(), "cleanerclip-fc")
        dist = self.ctx.dist
        own = torch.arange(dist.rank, len(self._facts), dist.world_size)
        g = torch.Generator().manual_seed(seed)
        pick = own[torch.randperm(len(own), generator=g)[: self._local]]
        return self._subset[pick], [self._facts[p] for p in pick.tolist()], random.Random(seed)

    def _texts(self, facts: list[SubCaption], rng: random.Random) -> tuple[list[str], list[str], int]:
        """T+ and T- texts of ``facts``, and how many counterfactuals fell back to the nouns."""
        negs = [self._cf.make(f, rng) for f in facts]
        return [f.text for f in facts], [c.text for c in negs], sum(c.fallback for c in negs)

    # ---- the loss --------------------------------------------------------------------------
    def _forward_all(self, batch: Batch, sub_pixels: torch.Tensor | None, sub_tokens: torch.Tensor | None):
        """One forward for originals, views, subset images and sub-captions.

        Returns (img, img_aug, txt, txt_aug, sub_img, sub_txt, scale); absent parts are None.
        """
        pix_aug, tok_aug = self._views(batch)
        b = batch.pixels.shape[0]
        pix = [batch.pixels] + [p for p in (pix_aug, sub_pixels) if p is not None]
        tok = [batch.tokens] + [t for t in (tok_aug, sub_tokens) if t is not None]
        img_all, txt_all, scale = self.ctx.forward(torch.cat(pix) if len(pix) > 1 else batch.pixels,
                                                   torch.cat(tok) if len(tok) > 1 else batch.tokens)
        img_aug = img_all[b:2 * b] if pix_aug is not None else None
        txt_aug = txt_all[b:2 * b] if tok_aug is not None else None
        sub_img = img_all[b + (b if pix_aug is not None else 0):] if sub_pixels is not None else None
        sub_txt = txt_all[b + (b if tok_aug is not None else 0):] if sub_tokens is not None else None
        return img_all[:b], img_aug, txt_all[:b], txt_aug, sub_img, sub_txt, scale

    def _in_batch_rows(self, batch: Batch) -> tuple[torch.Tensor, list[SubCaption]]:
        """``fc_per_step``: which rows of this local batch get sub-captions, with their facts."""
        b = batch.pixels.shape[0]
        order = torch.randperm(b, generator=batch.generator)[: self.opt.fc_per_step].tolist()
        rows, facts = [], []
        for r in sorted(order):
            fact = self._cf.factual(batch.captions[r])
            if fact is not None:
                rows.append(r)
                facts.append(fact)
        return torch.tensor(rows, dtype=torch.long), facts

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if self.opt.lambda3 == 0:
            img, img_aug, txt, txt_aug, _, scale = self._forward(batch)
            return self._clip_and_inmodal(img, img_aug, txt, txt_aug, scale)
        if self._in_batch():
            return self._loss_in_batch(batch)
        idx, facts, rng = self._draw(batch)
        pos, neg, fallback = self._texts(facts, rng)
        sub_pixels = to_pixels(self.ctx.data.images[idx], self.ctx.device) if len(idx) else None
        sub_tokens = self.ctx.tokenize(pos + neg) if len(idx) else None
        img, img_aug, txt, txt_aug, sub_img, sub_txt, scale = self._forward_all(batch, sub_pixels, sub_tokens)
        total, logs = self._clip_and_inmodal(img, img_aug, txt, txt_aug, scale)
        k = len(idx)
        if k == 0:   # an empty subset (fc_samples 0, or no caption with a noun) on every rank alike
            zero = img.sum() * 0.0
            return total + zero, {**logs, "fc_loss": 0.0, "fc_img_loss": 0.0, "fc_txt_loss": 0.0,
                                  "fc_rows": 0.0, "fc_fallback": 0.0}
        dist = self.ctx.dist
        l_fc, l_img, l_txt = subset_fc_loss(sub_img, sub_txt[:k], sub_txt[k:], self.opt.tau_pos,
                                            self.opt.tau_neg, dist)
        total = total + self.opt.lambda3 * l_fc
        logs.update({"fc_loss": float(l_fc.detach()), "fc_img_loss": float(l_img.detach()),
                     "fc_txt_loss": float(l_txt.detach()), "fc_rows": float(k * dist.world_size),
                     "fc_fallback": float(fallback)})
        return total, logs

    def _loss_in_batch(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        rows, facts = self._in_batch_rows(batch)
        pos, neg, fallback = self._texts(facts, batch.rng)
        extra = [self.ctx.tokenize(pos + neg)] if len(rows) else None
        img, img_aug, txt, txt_aug, sub, scale = self._forward(batch, extra)
        total, logs = self._clip_and_inmodal(img, img_aug, txt, txt_aug, scale)
        k = len(rows)
        l_img, l_txt = factual_counterfactual_terms(img[rows.to(img.device)], sub[:k], sub[k:2 * k],
                                                    self.opt.tau_pos, self.opt.tau_neg)
        l_fc = 0.5 * (l_img + l_txt)
        total = total + self.opt.lambda3 * l_fc
        logs.update({"fc_loss": float(l_fc.detach()), "fc_img_loss": float(l_img.detach()),
                     "fc_txt_loss": float(l_txt.detach()), "fc_rows": float(k), "fc_fallback": float(fallback)})
        return total, logs
