"""CleanerCLIP (2024): CleanCLIP plus factual / counterfactual sub-caption alignment.

Why: CleanCLIP's EDA views barely change a caption's meaning, so a trigger tied to clean
target features (BadCLIP) survives. For a random subset of samples, CleanerCLIP pulls each image
towards a factual sub-caption T+ (core nouns and verb kept) and away from counterfactual ones
T- (one adjective / verb / noun swapped), which re-draws fine-grained text boundaries the
trigger relies on. The paper's formulas are not recoverable from its text; this is the form we use:

  L_img_i = -log e^{<I_i,T+_i>/tp} / (e^{<I_i,T+_i>/tp} + sum_j e^{<I_i,T-_j>/tn})
  L_txt_i = -log e^{<T+_i,I_i>/tp} / (e^{<T+_i,I_i>/tp} + sum_{j != i} e^{<T+_i,I_j>/tn})
  L_fc = 1/2 (mean L_img + mean L_txt);  total = l1 CLIP + l2 in-modal + l3 L_fc

Subset: ``fc_samples`` samples per epoch (an int, or a fraction of the data when < 1), drawn
from a generator seeded by (seed, epoch); their sub-captions are built offline at the start of
the epoch (factual parse is cached, counterfactuals drawn from an epoch-seeded rng), so a resumed
run rebuilds exactly the same ones. ``fc_per_step`` instead picks that many samples of every
batch. The negatives are the subset members of the local batch (no cross-rank gather: subset
counts differ per rank); this never sees any poison label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from clipguard.data.subcaptions import SubcaptionGenerator
from clipguard.defenses import DEFENSES
from clipguard.defenses.cleanclip import CleanClip, CleanClipOptions
from clipguard.options import require
from clipguard.training.context import Batch, step_seed


def factual_counterfactual_loss(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                                tau_pos: float, tau_neg: float) -> torch.Tensor:
    """L_fc over k subset samples: img, pos (T+), neg (T-) are (k, D) L2-normalised features."""
    k = img.shape[0]
    if k == 0:
        return img.sum() * 0.0 + pos.sum() * 0.0 + neg.sum() * 0.0
    p = (img * pos).sum(-1, keepdim=True) / tau_pos                    # (k, 1)
    l_img = -F.log_softmax(torch.cat([p, img @ neg.t() / tau_neg], 1), 1)[:, 0]
    others = pos @ img.t() / tau_neg                                      # (k, k)
    others = others.masked_fill(torch.eye(k, dtype=torch.bool, device=img.device), float("-inf"))
    l_txt = -F.log_softmax(torch.cat([p, others], 1), 1)[:, 0]
    return 0.5 * (l_img.mean() + l_txt.mean())


@dataclass
class CleanerClipOptions(CleanClipOptions):
    """CleanCLIP's options plus L_fc's weight, temperatures and subset size."""

    kind: ClassVar[str] = "defense 'cleanerclip'"
    lambda3: float = 1.0              # weight of L_fc (0 with lambda2 = 0: plain CLIP)
    tau_pos: float = 0.3
    tau_neg: float = 0.3
    fc_samples: float = 1000          # samples with sub-captions per epoch: a count, or a fraction when < 1
    fc_per_step: int | None = None    # instead: this many samples of every batch
    slot_kinds: list[str] = field(default_factory=lambda: ["adj", "verb", "noun"])

    def validate(self) -> None:
        super().validate()
        require(self.lambda3 >= 0, f"lambda3 must be >= 0, got {self.lambda3}")
        require(self.tau_pos > 0 and self.tau_neg > 0, f"tau_pos and tau_neg must be > 0, got {self.tau_pos}, "
                f"{self.tau_neg}")
        require(self.fc_samples >= 0, f"fc_samples must be >= 0, got {self.fc_samples}")
        require(self.fc_per_step is None or self.fc_per_step >= 0, f"fc_per_step must be >= 0, got {self.fc_per_step}")
        bad = sorted(set(self.slot_kinds) - {"adj", "verb", "noun"})
        require(not bad and bool(self.slot_kinds), f"slot_kinds must be a non-empty list of adj, verb, noun; got "
                f"{self.slot_kinds}")


@DEFENSES.register("cleanerclip")
class CleanerClip(CleanClip):
    """CleanCLIP + lambda3 * L_fc on a random subset; lambda2 = lambda3 = 0 is plain CLIP."""

    name = "cleanerclip"
    options_class = CleanerClipOptions

    def __init__(self, options: CleanerClipOptions | None = None) -> None:
        super().__init__(options)
        self._gen = SubcaptionGenerator(kinds=tuple(self.opt.slot_kinds))
        self._row = torch.empty(0, dtype=torch.long)   # dataset index -> row in the epoch tables
        self._pos: list[str] = []
        self._neg: list[str] = []

    # ---- the epoch's subset, built offline ------------------------------------------------
    def _subset_size(self) -> int:
        n = len(self.ctx.data)
        k = int(round(self.opt.fc_samples * n)) if 0 < self.opt.fc_samples < 1 else int(self.opt.fc_samples)
        return min(k, n)

    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        n = len(self.ctx.data)
        self._row = torch.full((n,), -1, dtype=torch.long)
        self._pos, self._neg = [], []
        if self.opt.lambda3 == 0 or self.opt.fc_per_step is not None:
            return {}
        g = torch.Generator().manual_seed(step_seed(self.ctx.seed, "cleanerclip-subset", epoch))
        chosen = torch.randperm(n, generator=g)[: self._subset_size()]
        rng = random.Random(step_seed(self.ctx.seed, "cleanerclip-subcaptions", epoch))
        for i in chosen.tolist():
            pair = self._gen.pair(self.ctx.data.captions[i], rng)
            if pair is None:
                continue  # no noun found: the sample takes part in CLIP + in-modal only
            self._row[i] = len(self._pos)
            self._pos.append(pair[0].text)
            self._neg.append(pair[1].text)
        return {"fc_subset": len(self._pos)}

    def _batch_subcaptions(self, batch: Batch) -> tuple[torch.Tensor, list[str], list[str]]:
        """Which rows of this batch get sub-captions, with their T+ and T- texts."""
        if self.opt.fc_per_step is not None:
            b = batch.pixels.shape[0]
            order = torch.randperm(b, generator=batch.generator)[: self.opt.fc_per_step].tolist()
            rows, pos, neg = [], [], []
            for r in sorted(order):
                pair = self._gen.pair(batch.captions[r], batch.rng)
                if pair is not None:
                    rows.append(r)
                    pos.append(pair[0].text)
                    neg.append(pair[1].text)
            return torch.tensor(rows, dtype=torch.long), pos, neg
        table = self._row[batch.indices.cpu()]
        rows = torch.nonzero(table >= 0).flatten()
        return rows, [self._pos[t] for t in table[rows].tolist()], [self._neg[t] for t in table[rows].tolist()]

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        rows = torch.empty(0, dtype=torch.long)
        extra = None
        if self.opt.lambda3 > 0:
            rows, pos, neg = self._batch_subcaptions(batch)
            if len(rows):
                extra = [self.ctx.tokenize(pos + neg)]
        img, img_aug, txt, txt_aug, sub, scale = self._forward(batch, extra)
        total, logs = self._clip_and_inmodal(img, img_aug, txt, txt_aug, scale)
        if self.opt.lambda3 > 0:
            k = len(rows)
            l_fc = factual_counterfactual_loss(img[rows.to(img.device)], sub[:k], sub[k:2 * k],
                                               self.opt.tau_pos, self.opt.tau_neg)
            total = total + self.opt.lambda3 * l_fc
            logs["fc_loss"] = float(l_fc.detach())
            logs["fc_rows"] = float(k)
        return total, logs
