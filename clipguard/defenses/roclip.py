"""RoCLIP (Yang & Mirzasoleiman, NeurIPS 2023, Alg. 1): every K-th epoch, pair each augmented image with its nearest
caption in a FIFO pool of caption embeddings instead of its own caption; CLIP loss otherwise.

Which tower learns in pool epochs: BOTH. The match is chosen with the pool's stored (stale,
constant) caption embeddings, but the matched captions' tokens are kept in the pool too and
re-encoded by the current text tower inside the step's single forward, so the loss pulls the
text tower towards the images that chose those captions. The reference code used the stale
embeddings directly in the loss: the text tower then got no gradient at all in 1/K of the
epochs (a known bug of the reference code). ``text_gradient=False`` restores that behaviour.

Departures from the paper, all options: ``keep_own`` lets a pair whose image picks a pooled
caption like its own keep its own caption in pool epochs (training only on the model's own
guesses cost most of the accuracy at small scale; ``keep_own_margin`` also lets it when the model
finds its own caption nearly as likely as the pick), ``unmatched: drop`` leaves the other pairs out
of that step instead of training them on their picks, ``plain_views`` trains the plain epochs after
the first pool epoch on the pairs as given, ``pattern_z`` keeps the pairs whose image carries the
pixel pattern their caption group's suspects share out of every step, and ``assignment: balanced``
spreads a batch's picks over the pool instead of letting a few hub captions take most images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from clipguard.data.augment import Views
from clipguard.defenses import DEFENSES
from clipguard.defenses.alignment import ChanceMonitor
from clipguard.defenses.nn_pool import NNPool
from clipguard.defenses.pair_scores import embed_dim
from clipguard.defenses.pattern_veto import PatternVeto
from clipguard.options import Options, require
from clipguard.training.context import Batch, TrainContext, step_seed
from clipguard.training.distributed import all_gather_nograd
from clipguard.training.losses import (
    clip_loss,
    grouped_clip_loss,
    own_caption_unlearning,
    small_loss_clip_loss,
)
from clipguard.training.strategy import PairSelector, Strategy


@dataclass
class RoClipOptions(Options):
    """RoCLIP's settings: the paper's (Alg. 1), except ``keep_own``, ``crop_scale_min``,
    ``align_before_pool``, ``keep_own_margin``, ``plain_trains_kept``, ``unmatched``, ``plain_views``,
    ``pattern_z``, ``pattern_text``, ``pool_crop_scale_min`` and ``pattern_unlearn``, chosen on validation data
    (docs/defenses.md); ``configs/roclip.yaml`` is the paper's as published,
    ``configs/roclip-previous.yaml`` the defaults before the twenty-second validation round,
    ``configs/roclip-align.yaml`` those from the twenty-second to the twenty-fourth,
    ``configs/roclip-drop.yaml`` the twenty-fourth's, ``configs/roclip-views.yaml`` the twenty-fifth's,
    ``configs/roclip-veto.yaml`` the twenty-seventh's, ``configs/roclip-text.yaml`` the
    twenty-eighth's and ``configs/roclip-crop.yaml`` the twenty-ninth's."""

    kind: ClassVar[str] = "defense 'roclip'"
    match_every: int = 2              # K: every K-th epoch pairs images with pooled captions
    # the share of the epoch budget trained as plain (augmented) CLIP before the K-epoch cycle of
    # pool epochs starts; 0 = the paper (the first pool epoch is epoch K). A model that has not yet
    # left chance picks the same few captions for every image, and pool epochs then collapse it
    pool_start: float = field(default=0.0, metadata={"neutral": 0.0})
    # a pool epoch comes only once the model has left chance: while the plain epoch before a
    # scheduled pool epoch had a mean CLIP loss above this share of chance (log of the global batch),
    # that epoch is trained plain too; once one passes, the schedule runs as set. None = off (the
    # paper). Unlike pool_start it waits on the data, not on a share of the budget
    align_before_pool: float | None = field(default=0.97, metadata={"neutral": None})
    pool_fraction: float = 0.02       # pool size as a fraction of the data (the paper: 2%)
    pool_size: int | None = None      # an absolute pool size instead of pool_fraction
    augment: bool = True              # SimCLR images and EDA captions
    text_gradient: bool = True        # False: pooled captions enter as stored embeddings (the reference code)
    match_on: Literal["augmented", "original"] = "augmented"  # which view of an image picks its caption
    # In pool epochs a pair keeps its own caption when the image's pooled caption is among this
    # fraction of the pool nearest to that own caption (they agree); 0 = the paper, always pooled
    keep_own: float = 0.1
    # how many pool epochs in a row a pair's pick must agree with its own caption before it keeps
    # it (1: every pool epoch decides afresh). A clean pair agrees epoch after epoch; a poisoned
    # one agrees now and then, when its augmented view happens to look like the target
    keep_own_streak: int = field(default=1, metadata={"neutral": 1})
    # a pair also agrees when the model finds its own caption nearly as likely for its image as the
    # pick: the log-odds of the pick over the own caption, at the model's logit scale, below this many
    # nats (0 = off). A clean image of a class the model confuses picks a caption of the wrong class
    # that is only a little nearer than its own; a poisoned image's own caption is far from it
    keep_own_margin: float = field(default=1.0, metadata={"neutral": 0.0})
    # how images pick pooled captions: each its nearest (the paper), or a balanced assignment
    # (Sinkhorn-Knopp, as SwAV's equipartition) in which every pooled caption is picked about
    # equally often within a batch, so a few hub captions cannot take most of the images
    assignment: Literal["nearest", "balanced"] = "nearest"
    # images of a batch paired with the same pooled caption: "separate", each row its own class as
    # in the paper (the shared caption is also a negative of its own images); "merge", the distinct
    # captions are the classes (training.losses.grouped_clip_loss)
    pool_duplicates: Literal["separate", "merge"] = "separate"
    crop_scale_min: float = 0.5       # the paper (SimCLR): 0.08
    # the smallest crop of a pool epoch's image views (None: crop_scale_min, as every view). The pool
    # epochs train the kept pairs on their views, and a small crop is what costs the views their
    # accuracy (docs/roclip-selection.md, the twenty-fifth round's diagnostics); the plain epochs
    # before the first pool epoch keep crop_scale_min, which slows a trigger's learning there. 1.0
    # (no crop but the aspect-ratio draw's; the views keep their flips and colour jitter) since the
    # twenty-ninth round, which found it keeps 2-9 more zero-shot points on every validation grid
    pool_crop_scale_min: float | None = field(default=1.0, metadata={"neutral": None})
    eda_alpha: float = 0.1
    eda_p_delete: float = 0.1
    # the share of image views also Gaussian-blurred (SimCLR's blur, absent from its 28 px recipe):
    # a blur washes out a high-frequency trigger such as Blended's noise pattern
    blur_p: float = field(default=0.0, metadata={"neutral": 0.0})
    # the share of image views mirrored left-right (SimCLR: 0.5; open_clip's training transform: 0)
    flip_p: float = field(default=0.5, metadata={"neutral": 0.5})
    # in pool epochs, the pairs whose pick disagrees with their own caption (needs keep_own or keep_own_margin):
    # "pooled", trained on the picked caption (the paper); "drop", left out of that step's loss, so
    # no pair is trained on a caption the model chose for it
    unmatched: Literal["pooled", "drop"] = field(default="drop", metadata={"neutral": "pooled"})
    # after the first pool epoch, a plain epoch trains only the pairs that kept their own caption in
    # the latest pool epoch (needs keep_own or keep_own_margin; pairs that epoch did not reach train
    # as usual): a poisoned pair, re-paired in the pool epochs, is not trained on its caption in the
    # plain epochs between them either
    plain_trains_kept: bool = field(default=True, metadata={"neutral": False})
    # with plain_trains_kept: the images of the pairs a plain step leaves out are extra negatives of
    # the kept captions (caption-to-image direction only), so a poisoned image the model has tied to
    # a caption is pushed away from it (SafeCLIP's risky_negatives)
    plain_negatives: bool = field(default=False, metadata={"neutral": False})
    # the share of each plain step's pairs, those with the lowest own CLIP loss, that train (None:
    # every pair). A pair whose caption does not fit its image keeps a high loss while the clean
    # pairs align, so a trigger is not learnt in the plain epochs before the first pool epoch
    # (small-loss selection, as SafeCLIP's clip_warmup_keep); the alignment gate reads the whole
    # batch's loss
    plain_keep: float | None = field(default=None, metadata={"neutral": None})
    # what a plain (non-pool) epoch trains on, with ``augment``: "augmented", SimCLR images and EDA
    # captions as in the pool epochs (the paper); "original", the pairs as given; "original-after-pool",
    # augmented until the first pool epoch and as given after it (the default). The pool epochs always
    # augment (the pick must not hinge on one view). Augmented views cost a small model accuracy; after
    # a pool epoch the plain epochs train only the kept pairs, while before it every pair trains and
    # the crops slow a trigger's learning ("original" let BadNet through on validation data).
    # "original-captions-after-pool": after the first pool epoch the captions as given and the images
    # still augmented (the views wash out an image trigger such as Blended's noise);
    # "geometric-after-pool": the captions as given and the images cropped and flipped only (no colour
    # jitter or grey)
    plain_views: Literal["augmented", "original", "original-after-pool", "original-captions-after-pool",
                         "geometric-after-pool"] = field(default="original-after-pool",
                                                         metadata={"neutral": "augmented"})
    # the pattern veto (defenses/pattern_veto.py, as SafeCLIP's): at the end of each pool epoch a pair
    # whose high-passed image carries the pattern shared by the pattern_share most suspect pairs of its
    # caption group (pattern_clusters groups, k-means on the captions; suspect: the pairs whose pick
    # failed the keep test, then the lowest agreement) by more than pattern_z robust standard
    # deviations trains in no step until the next pool epoch's veto. A pixel pattern is what a
    # backdoor's poisons share and clean pairs do not; the keep test alone lets a few poisons keep
    # their caption (their augmented view happened to look like the target's), and with the plain
    # epochs on the pairs as given those few teach a blended trigger. None = off (the paper); 4 was
    # chosen on validation data in the twenty-seventh round (3 cost accuracy in the twenty-sixth)
    pattern_z: float | None = field(default=4.0, metadata={"neutral": None})
    pattern_share: float = field(default=0.1, metadata={"neutral": 0.1, "only_with": "pattern_z"})
    pattern_clusters: int = field(default=50, metadata={"neutral": 50, "only_with": "pattern_z"})
    # the pairs each caption group holds on average: fewer than pattern_clusters groups on data too
    # small for that many (None: always pattern_clusters), as SafeCLIP's
    pattern_group_pairs: int | None = field(default=None, metadata={"neutral": None, "only_with": "pattern_z"})
    # which pairs of a caption group the veto takes as its suspects: "latest", ranked by the latest pool
    # epoch's keep test (its failures first, then how far each pick ranked from the own caption);
    # "cumulative", by how many pool epochs so far each pair failed the keep test, ties broken as in
    # "latest". A poison whose trigger the model has partly learnt picks its target's caption and passes
    # the later tests, so it leaves the latest suspects; the tests it failed before stay counted
    pattern_suspects: Literal["latest", "cumulative"] = field(default="latest",
                                                              metadata={"neutral": "latest", "only_with": "pattern_z"})
    # the caption embeddings the veto groups the pairs by: "encode", every caption encoded afresh at the
    # pool epoch's end; "pool-epoch", the embedding of each pair's own (augmented) caption that its pool
    # step already computed (pairs the epoch did not reach are encoded), which saves a pass of the text
    # tower over the data at every pool epoch (the default since the twenty-eighth round, which found it
    # defends as well on validation data; "cumulative" suspects failed that round)
    pattern_text: Literal["encode", "pool-epoch"] = field(default="pool-epoch",
                                                          metadata={"neutral": "encode", "only_with": "pattern_z"})
    # the weight of a term that unlearns the pairs the pattern veto flagged at the latest pool epoch, in
    # every step until the next veto: each flagged image of the batch is pushed below the batch's mean
    # caption score for its own caption (losses.own_caption_unlearning, as SafeCLIP's pattern_unlearn).
    # The veto keeps a flagged pair out of the loss from then on, but a trigger learnt before (the first
    # epochs train every pair) stays; this term unlearns it. None: no such term (the paper). 0.02 since
    # the thirty-first round, which found it lowers every backdoor on every validation grid at no more
    # than 0.3 zero-shot points (0.05 cost 0.7 in the thirtieth, 0.03 cost 1.0 on the held-back twin in
    # the thirty-first; at 60,000 pairs, measured once, it cost 1.8-2.2 and grew the veto's flags,
    # docs/results.md). Without the pattern veto (pattern_z None) nothing is flagged and it does nothing
    pattern_unlearn: float | None = field(default=0.02, metadata={"neutral": None, "only_with": "pattern_z"})

    def validate(self) -> None:
        require(0.0 <= self.blur_p <= 1.0, f"blur_p must be in [0, 1], got {self.blur_p}")
        require(self.pool_crop_scale_min is None or 0.0 < self.pool_crop_scale_min <= 1.0,
                f"pool_crop_scale_min must be in (0, 1] (or None: crop_scale_min), got {self.pool_crop_scale_min}")
        require(0.0 <= self.flip_p <= 1.0, f"flip_p must be in [0, 1], got {self.flip_p}")
        require(self.unmatched == "pooled" or self.keep_own > 0 or self.keep_own_margin > 0,
                "unmatched: drop (the default) needs keep_own > 0 or keep_own_margin > 0 (without either every "
                "pair of a pool epoch would be dropped); with both at 0 set unmatched: pooled, as the paper "
                "(configs/roclip.yaml)")
        require(self.unmatched == "pooled" or self.pool_duplicates == "separate",
                "unmatched: drop (the default) trains only on own captions, so pool_duplicates must stay "
                "'separate'; set unmatched: pooled to merge")
        require(self.match_every >= 1, f"match_every (K) must be >= 1, got {self.match_every}")
        require(0.0 <= self.pool_start < 1.0, f"pool_start must be in [0, 1), got {self.pool_start}")
        require(self.align_before_pool is None or 0.0 < self.align_before_pool <= 1.0,
                f"align_before_pool must be in (0, 1] (a share of chance's loss) or null, got {self.align_before_pool}")
        require(0.0 < self.pool_fraction <= 1.0, f"pool_fraction must be in (0, 1], got {self.pool_fraction}")
        require(self.pool_size is None or self.pool_size >= 1, f"pool_size must be >= 1, got {self.pool_size}")
        require(0.0 < self.crop_scale_min <= 1.0, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        require(0.0 <= self.eda_alpha <= 1.0 and 0.0 <= self.eda_p_delete <= 1.0,
                "eda_alpha and eda_p_delete must be in [0, 1]")
        require(0.0 <= self.keep_own < 1.0, f"keep_own must be in [0, 1), got {self.keep_own}")
        require(self.keep_own_streak >= 1, f"keep_own_streak must be >= 1, got {self.keep_own_streak}")
        require(self.keep_own_margin >= 0, f"keep_own_margin must be >= 0 (nats), got {self.keep_own_margin}")
        require(not self.plain_trains_kept or self.keep_own > 0 or self.keep_own_margin > 0,
                "plain_trains_kept (the default) needs keep_own > 0 or keep_own_margin > 0 (no pair keeps its "
                "caption without either); with both at 0 set plain_trains_kept: false, as the paper")
        require(not self.plain_negatives or self.plain_trains_kept, "plain_negatives needs plain_trains_kept")
        require(self.plain_keep is None or 0.0 < self.plain_keep <= 1.0,
                f"plain_keep must be in (0, 1] (or None: every pair), got {self.plain_keep}")
        require(self.keep_own_streak == 1 or self.keep_own > 0 or self.keep_own_margin > 0,
                "keep_own_streak needs keep_own > 0 or keep_own_margin > 0")
        require(self.pattern_z is None or self.pattern_z > 0,
                f"pattern_z must be > 0 (or None: no pattern veto), got {self.pattern_z}")
        require(self.pattern_z is None or self.keep_own > 0 or self.keep_own_margin > 0,
                "pattern_z needs keep_own > 0 or keep_own_margin > 0 (the keep test ranks the suspects)")
        require(0.0 < self.pattern_share < 1.0, f"pattern_share must be in (0, 1), got {self.pattern_share}")
        require(self.pattern_unlearn is None or self.pattern_unlearn > 0,
                f"pattern_unlearn must be > 0 (or None: no unlearning term), got {self.pattern_unlearn}")
        require(self.pattern_clusters >= 1, f"pattern_clusters must be >= 1, got {self.pattern_clusters}")
        require(self.pattern_group_pairs is None or self.pattern_group_pairs >= 1,
                f"pattern_group_pairs must be >= 1 (or None: pattern_clusters groups), got {self.pattern_group_pairs}")


def pick_rank(own: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rank of each image's pooled caption ``idx`` among the pool's embeddings ``bank`` sorted by
    similarity to the pair's own caption ``own`` (0 = the entry nearest to it)."""
    sims = own.to(bank.device, bank.dtype) @ bank.t()
    return (sims > sims.gather(1, idx.to(bank.device).unsqueeze(1))).sum(1)


def rank_agrees(rank: torch.Tensor, keep_own: float, pool_size: int) -> torch.Tensor:
    """``keep_own``'s test: the pick ranks within that share of the pool nearest to the own caption."""
    return rank < max(1, int(keep_own * pool_size))


def pick_log_odds(img: torch.Tensor, picked: torch.Tensor, own: torch.Tensor, scale: torch.Tensor | float
                  ) -> torch.Tensor:
    """Each image's log-odds of its picked caption over its own at the logit ``scale`` (rows of
    ``img``, ``picked`` and ``own`` are L2-normalised embeddings, in ``img``'s float dtype)."""
    img = img.float()
    gap = (img * picked.to(img.device, img.dtype)).sum(1) - (img * own.to(img.device, img.dtype)).sum(1)
    return scale.to(img.device, img.dtype) * gap if isinstance(scale, torch.Tensor) else scale * gap


@torch.no_grad()
def balanced_assignment(sims: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Each row's column under an (approximately) equipartitioned assignment: Sinkhorn-Knopp on
    exp(sims / epsilon) with every row weighing 1 and every column rows/columns, then each row's
    largest entry. Rows that the plain argmax would pile onto one column spread over its
    neighbours instead."""
    q = ((sims.double() - sims.max()) / epsilon).exp()
    rows, cols = q.shape
    for _ in range(iterations):
        q = q / q.sum(0, keepdim=True).clamp_min(1e-300) * (rows / cols)
        q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
    return q.argmax(1)


@DEFENSES.register("roclip")
class RoClip(Strategy, PairSelector):
    """CLIP with augmentations; in pool epochs the positives come from a caption pool.

    As a PairSelector it reports the matching of its latest finished pool epoch to the
    diagnostics: each pair's agreement (1 - the rank of the image's pooled caption among the pool
    sorted by similarity to the pair's own caption, as a fraction) and, with ``keep_own``, the
    pairs that kept their own caption."""

    name = "roclip"
    options_class = RoClipOptions
    # pool epochs each pair failed the keep test in: held only where the veto ranks its suspects by
    # them (pattern_suspects: cumulative)
    _failures: torch.Tensor | None = None

    def __init__(self, options: RoClipOptions | None = None):
        super().__init__(options)
        o = self.opt
        strengths = dict(eda_alpha=o.eda_alpha, eda_p_delete=o.eda_p_delete, blur_p=o.blur_p, flip_p=o.flip_p)
        self._views = Views(crop_scale_min=o.crop_scale_min, **strengths)
        self._pool_views = (self._views if o.pool_crop_scale_min is None
                            else Views(crop_scale_min=o.pool_crop_scale_min, **strengths))
        self._pattern = (PatternVeto(o.pattern_z, o.pattern_share, o.pattern_clusters,
                                     group_pairs=o.pattern_group_pairs)
                         if o.pattern_z is not None else None)

    def scheduled_pool_epoch(self, epoch: int) -> bool:
        """Alg. 1 counts epochs from 1 and matches when epoch % K == 0; with ``pool_start`` the
        count starts after the first round(pool_start x epochs) epochs."""
        e = epoch + 1 - round(self.opt.pool_start * self.ctx.epochs)
        return e >= 1 and e % self.opt.match_every == 0

    def is_pool_epoch(self, epoch: int) -> bool:
        """A scheduled pool epoch, unless ``align_before_pool`` holds it back (decided when the
        epoch starts, from the plain epoch before it)."""
        if not self.scheduled_pool_epoch(epoch):
            return False
        return self.opt.align_before_pool is None or (self._aligned_at is not None and epoch >= self._aligned_at)

    def _open_gate(self, epoch: int) -> dict[str, Any]:
        """With ``align_before_pool``, at a scheduled pool epoch before the first one that ran:
        let it run if the plain epoch before it left chance, else train it plain."""
        if (self.opt.align_before_pool is None or self._aligned_at is not None
                or not self.scheduled_pool_epoch(epoch)):
            return {}
        ratio = self._plain.global_ratio(self.ctx)
        if ratio is not None and ratio <= self.opt.align_before_pool:
            self._aligned_at = epoch
            return {}
        return {"pool_deferred": True, "plain_loss_vs_chance": None if ratio is None else round(ratio, 4)}

    def bind(self, ctx: TrainContext) -> None:
        super().bind(ctx)
        size = self.opt.pool_size or max(1, int(round(self.opt.pool_fraction * len(ctx.data))))
        self._resolved_pool_size = size
        if not hasattr(self, "_pool"):
            self._pool = NNPool(size, embed_dim(ctx.raw_model), payload_shape=(ctx.tokens.shape[1],)).to(ctx.device)
        self._match_epoch: int | None = None  # the pool epoch the match records below belong to
        self._agreement = torch.full((len(ctx.data),), float("nan"))
        self._kept = torch.zeros(len(ctx.data), dtype=torch.bool)
        self._agreed = torch.zeros(len(ctx.data), dtype=torch.bool)  # the latest pool epoch's agreement test
        if not hasattr(self, "_streak"):  # pool epochs in a row each pair agreed, before the current one
            self._streak = torch.zeros(len(ctx.data), dtype=torch.long)
        self._plain = ChanceMonitor()    # the CLIP loss of the latest epoch, when it was a plain one
        if not hasattr(self, "_aligned_at"):  # the first pool epoch align_before_pool let through
            self._aligned_at: int | None = None
        if not hasattr(self, "_patterned"):  # the pattern veto's flags at the latest pool epoch's end
            self._patterned: torch.Tensor | None = None
        if self._failures is None and self._pattern is not None and self.opt.pattern_suspects == "cumulative":
            self._failures = torch.zeros(len(ctx.data), dtype=torch.long)
        # the latest pool epoch's own-caption embeddings, for the veto's caption groups (pattern_text)
        self._own_text = (torch.full((len(ctx.data), embed_dim(ctx.raw_model)), float("nan"))
                          if self._pattern is not None and self.opt.pattern_text == "pool-epoch" else None)

    # ------------------------------------------------------------------ augmentation
    def _images(self, batch: Batch, geometric_only: bool = False, pool_epoch: bool = False) -> torch.Tensor:
        if not self.opt.augment:
            return batch.pixels
        views = self._pool_views if pool_epoch else self._views
        return views.images(batch.pixels, batch.generator, geometric_only=geometric_only)

    def _texts(self, captions: list[str], rng: random.Random) -> list[str]:
        return self._views.texts(captions, rng) if self.opt.augment else list(captions)

    def _plain_views(self) -> tuple[Literal["simclr", "geometric", "none"], bool]:
        """The image view this plain epoch's steps train on (SimCLR's, "geometric": cropped and
        flipped only, or "none": the images as given) and whether their captions get EDA views
        (``plain_views``)."""
        views = self.opt.plain_views
        if not self.opt.augment or views == "original":
            return "none", False
        if views == "augmented" or self._match_epoch is None:
            return "simclr", True
        after = {"original-captions-after-pool": "simclr", "geometric-after-pool": "geometric"}
        return after.get(views, "none"), False

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        gate = self._open_gate(epoch)
        pool_epoch = self.is_pool_epoch(epoch)
        record: dict[str, Any] = {"pool_epoch": pool_epoch, "pool_size": self._pool.size, **gate}
        if pool_epoch:
            ratio = self._plain.check(
                self.ctx, f"roclip: pool epoch {epoch + 1}",
                "the model cannot match images to captions yet, so the pool epochs will pair most images "
                "with a few captions and may collapse it. Plain epochs first help: --opt align_before_pool=0.97 "
                "(the default) holds a pool epoch until the model has left chance, or --opt pool_start=0.5 "
                "--opt match_every=1 (docs/defenses.md, RoCLIP)")
            if ratio is not None:
                record["plain_loss_vs_chance"] = ratio
        else:
            self._plain.reset()
        if pool_epoch and len(self._pool) < self._pool.size:
            self._fill_pool(epoch)
        return record

    @torch.no_grad()
    def _fill_pool(self, epoch: int) -> None:
        """Initialise the pool with random (seeded, augmented) captions, as the paper does."""
        ctx = self.ctx
        g = torch.Generator().manual_seed(step_seed(ctx.seed, "roclip-pool", epoch))
        need = self._pool.size - len(self._pool)
        idx = torch.randperm(len(ctx.data), generator=g)[:need]
        caps = self._texts([ctx.data.captions[i] for i in idx.tolist()],
                           random.Random(step_seed(ctx.seed, "roclip-pool-eda", epoch)))
        tokens = ctx.tokenize(caps)
        from clipguard.evaluation.features import encode_tokens

        feats = encode_tokens(ctx.raw_model, tokens, ctx.device).to(ctx.device)
        self._pool.push(feats, tokens)

    # ------------------------------------------------------------------ loss
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ctx = self.ctx
        pool_epoch = self.is_pool_epoch(ctx.epoch)
        image_view, captions = ("simclr", True) if pool_epoch else self._plain_views()
        pixels = batch.pixels if image_view == "none" else self._images(batch, image_view == "geometric", pool_epoch)
        caps = self._texts(batch.captions, batch.rng) if captions else list(batch.captions)
        tokens = ctx.tokenize(caps)
        if not pool_epoch:
            img, txt, scale = ctx.forward(pixels, tokens)
            rows = self._plain_rows(batch.indices, img.device)
            negatives = ~rows if rows is not None and self.opt.plain_negatives else None
            loss, logs = small_loss_clip_loss(img, txt, scale, ctx.dist, self.opt.plain_keep, mask=rows,
                                              negatives=negatives)
            loss = self._unlearn(loss, logs, img, txt, scale, batch.indices)
            self._push(txt, tokens)
            self._plain.add(logs["clip_loss"])
            return loss, logs
        stats: dict[str, float] = {}
        if self.opt.text_gradient and self.opt.unmatched == "drop":
            # only the kept pairs train, on their own captions: the step's one text encode is the
            # batch's own captions, which the pool and the agreement test read without gradient
            img, matched, scale, nn_idx, rank, agreed, kept = self._pool_forward(batch, pixels, tokens, None)
            own = matched.detach()
        elif self.opt.text_gradient:
            own = ctx.encode_views(tokens=tokens)[1]  # for the pool (and the agreement test): no gradient
            img, matched, scale, nn_idx, rank, agreed, kept = self._pool_forward(batch, pixels, tokens, own)
        else:
            img, own, scale = ctx.forward(pixels, tokens)
            nn_idx = self._pick(img.detach().float())
            rank = self._pick_rank(own.detach(), nn_idx)
            agreed = self._agreement_now(rank, img.detach(), own.detach(), nn_idx, scale.detach())
            kept = self._kept_rows(agreed, batch.indices).to(img.device)
            # kept pairs use their own caption, encoded in the step; the others the stored embedding
            matched = torch.where(kept.unsqueeze(1), own, self._pool.bank[nn_idx].to(img.dtype))
        if self._tests_agreement:
            stats["kept_own_fraction"] = float(kept.float().mean())
        if self.opt.unmatched == "drop":
            loss = clip_loss(img, matched, scale, ctx.dist, mask=kept.to(img.device))
        elif self.opt.pool_duplicates == "merge":
            # a pooled caption's id is its pool slot; a pair that kept its own caption is its own group
            groups = torch.where(kept.to(nn_idx.device), len(self._pool) + batch.indices.to(nn_idx.device), nn_idx)
            loss = grouped_clip_loss(img, matched, scale, groups, ctx.dist)
        else:
            loss = clip_loss(img, matched, scale, ctx.dist)
        pool_loss = float(loss.detach())
        # the batch's own captions (in the first branch above ``matched`` holds them, with the text
        # tower's gradient)
        own_text = matched if self.opt.text_gradient and self.opt.unmatched == "drop" else own
        loss = self._unlearn(loss, stats, img, own_text, scale, batch.indices)
        self._record(batch.indices, rank, kept, agreed, own)
        self._push(own, tokens)
        unique = float((nn_idx.unsqueeze(1) == nn_idx.unsqueeze(0)).float().sum(1).eq(1).float().mean())
        return loss, {"pool_loss": pool_loss, "unique_match_fraction": unique, **stats}

    def _unlearn(self, loss: torch.Tensor, logs: dict[str, float], img: torch.Tensor, own: torch.Tensor,
                 scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``pattern_unlearn``: add the term that unlearns this batch's pairs the veto flagged at the
        latest pool epoch (``own``: each row's own caption's features)."""
        if self.opt.pattern_unlearn is None or self._patterned is None:
            return loss
        rows = self._patterned[indices.cpu()].to(img.device)
        term = own_caption_unlearning(img, own, scale, rows)
        logs["pattern_unlearn"] = float(term.detach())
        return loss + self.opt.pattern_unlearn * term

    def _plain_rows(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """With ``plain_trains_kept``, after a pool epoch: the rows of a plain step that kept their own
        caption in the latest pool epoch, or that it did not reach (None: every row)."""
        if not self.opt.plain_trains_kept or self._match_epoch is None:
            return None if self._patterned is None else self._unflagged(indices, device)
        rows = indices.cpu()
        return (self._kept[rows] | self._agreement[rows].isnan()).to(device) & self._unflagged(indices, device)

    def _unflagged(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        """bool per row of ``indices``: not flagged by the pattern veto (every row without it)."""
        if self._patterned is None:
            return torch.ones(len(indices), dtype=torch.bool, device=device)
        return (~self._patterned[indices.cpu()]).to(device)

    @torch.no_grad()
    def _pick(self, img: torch.Tensor) -> torch.Tensor:
        """The pooled caption each image is paired with (index into the pool's bank)."""
        if self.opt.assignment == "nearest":
            return self._pool.nearest_index(img)
        return balanced_assignment(img.to(self._pool.bank.device) @ self._pool.bank[:len(self._pool)].t())

    def _pick_rank(self, own: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rank of each image's pooled caption ``idx`` among the pool's stored embeddings sorted
        by similarity to the pair's own caption ``own`` (0 = the entry nearest to it)."""
        return pick_rank(own, self._pool.bank[:len(self._pool)], idx)

    @property
    def _tests_agreement(self) -> bool:
        """Whether pool epochs test each pair's pick against its own caption at all."""
        return self.opt.keep_own > 0 or self.opt.keep_own_margin > 0

    def _agrees(self, own: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Whether each image's pooled caption ``idx`` ranks within the ``keep_own`` fraction of
        the pool nearest to the pair's own caption ``own`` (no gradient). A clean pair's image
        picks a caption like its own; a poisoned image picks one of its true content, far from
        the caption it was paired with."""
        return self._rank_agrees(self._pick_rank(own, idx))

    def _rank_agrees(self, rank: torch.Tensor) -> torch.Tensor:
        """The pairs whose picks agree with their own captions, from the picks' ranks (none at
        keep_own 0)."""
        if self.opt.keep_own <= 0:
            return torch.zeros_like(rank, dtype=torch.bool)
        return rank_agrees(rank, self.opt.keep_own, len(self._pool))

    @torch.no_grad()
    def _agreement_now(self, rank: torch.Tensor, img: torch.Tensor, own: torch.Tensor, idx: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
        """This pool step's agreement test: the pick's rank (``keep_own``) or, with
        ``keep_own_margin``, the image's log-odds of its pick (by the pool's stored embedding, as
        it was picked) over its own caption ``own`` at the logit ``scale``."""
        agree = self._rank_agrees(rank)
        if self.opt.keep_own_margin <= 0:
            return agree
        log_odds = pick_log_odds(img, self._pool.bank[idx.to(self._pool.bank.device)], own, scale)
        return agree | (log_odds < self.opt.keep_own_margin).to(agree.device)

    def _kept_rows(self, agree: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The pairs (rows ``indices``) that keep their own caption: they agree now (``agree``,
        this step's test), with ``keep_own_streak`` > 1 also agreed in the pool epochs just
        before, and the pattern veto (``pattern_z``) did not flag them at the latest pool epoch."""
        kept = agree & self._unflagged(indices, agree.device)
        if self.opt.keep_own_streak == 1:
            return kept
        before = self._streak[indices.cpu()].to(agree.device)
        return kept & (before + 1 >= self.opt.keep_own_streak)

    @torch.no_grad()
    def _record(self, indices: torch.Tensor, rank: torch.Tensor, kept: torch.Tensor, agreed: torch.Tensor,
                own: torch.Tensor) -> None:
        """Keep this (global) batch's match for the diagnostics and the agreement streaks (and, with
        ``pattern_text: pool-epoch``, its own captions' embeddings ``own``); a new pool epoch starts
        afresh."""
        if self._match_epoch != self.ctx.epoch:
            self._match_epoch = self.ctx.epoch
            self._agreement.fill_(float("nan"))
            self._kept.zero_()
            self._agreed.zero_()
            if self._own_text is not None:
                self._own_text.fill_(float("nan"))
        score = 1.0 - rank.float() / max(1, len(self._pool) - 1)
        dev = self.ctx.device
        # one gather for every column (float64 holds the indices exactly)
        cols = [indices.to(dev).double(), score.to(dev).double(), kept.to(dev).double(), agreed.to(dev).double()]
        rows = torch.stack(cols, dim=1)
        if self._own_text is not None:
            rows = torch.cat([rows, own.detach().to(dev).double()], dim=1)
        rows = all_gather_nograd(rows, self.ctx.dist).cpu()
        idx = rows[:, 0].long()
        self._agreement[idx] = rows[:, 1].float()
        self._kept[idx] = rows[:, 2].bool()
        self._agreed[idx] = rows[:, 3].bool()
        if self._own_text is not None:
            self._own_text[idx] = rows[:, 4:].float()

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        """After a pool epoch (the epoch whose steps recorded matches), count its agreements into
        each pair's streak (a pair the epoch did not reach keeps its streak) and, with
        ``pattern_z``, let the pattern veto judge every pair."""
        record: dict[str, Any] = {}
        if self._match_epoch != epoch:
            return record
        seen = ~self._agreement.isnan()
        if self._failures is not None:
            self._failures += (seen & ~self._agreed).long()
        if self.opt.keep_own_streak > 1:
            grown = torch.where(self._agreed, self._streak + 1, torch.zeros_like(self._streak))
            self._streak = torch.where(seen, grown, self._streak)
            record["keep_own_streak_met"] = float((self._streak >= self.opt.keep_own_streak).float().mean())
        if self._pattern is not None:
            self._patterned = self._pattern.vetoed(self.ctx, self._suspicion(), text=self._own_text)
            record["pattern_flagged"] = int(self._patterned.sum())
        return record

    def _suspicion(self) -> torch.Tensor:
        """One value per pair, higher for a more suspect pair at the latest pool epoch: the pairs whose
        pick failed the keep test first (the test itself, not the veto's earlier verdicts), then by how
        far the pick ranked from the own caption (pairs the epoch did not reach: least suspect). With
        ``pattern_suspects: cumulative`` the count of pool epochs whose test a pair failed comes first,
        and the latest epoch's order breaks its ties."""
        seen = ~self._agreement.isnan()
        far = torch.where(seen, 1.0 - self._agreement, torch.zeros_like(self._agreement))
        latest = far.double() + (seen & ~self._agreed).double()  # in [0, 2]
        if self._failures is not None:
            return 3.0 * self._failures.double() + latest
        return latest

    # ------------------------------------------------------------------ diagnostics
    def pair_scores(self) -> torch.Tensor | None:
        """Agreement of each pair's pooled caption with its own in the latest finished pool epoch
        (pairs that epoch did not reach get the median); None before the first one."""
        if self._match_epoch is None or self._match_epoch >= self.ctx.epoch:
            return None
        a = self._agreement.clone()
        seen = ~a.isnan()
        a[~seen] = a[seen].median() if bool(seen.any()) else 0.0
        return a

    def selected(self) -> torch.Tensor | None:
        """With ``keep_own``: the pairs that kept their own caption in the latest pool epoch and
        that the pattern veto, if on, did not flag after it."""
        if not self._tests_agreement or self._match_epoch is None or self._match_epoch >= self.ctx.epoch:
            return None
        return self._kept & ~self._patterned if self._patterned is not None else self._kept.clone()

    def _pool_forward(self, batch: Batch, pixels: torch.Tensor, tokens: torch.Tensor, own: torch.Tensor | None
                      ) -> tuple[torch.Tensor, ...]:
        """A pool step's one forward, in stages: encode the images, let each pick its nearest
        pooled caption by the pool's stored embedding, then encode the picked captions' tokens
        with the current text tower (so it gets gradient). With ``keep_own`` a pair whose pick
        agrees with its own caption encodes that own caption instead. ``own`` None (``unmatched:
        drop``, where no pair trains on its pick): the own captions are encoded with gradient
        before the pick and tested as they are, and the returned text features are theirs. With
        ``match_on: original`` the pick uses the un-augmented image, which needs an extra forward
        without gradient first. Returns the features and scale, and each image's pick, its rank,
        whether it agrees with its own caption in this step's test and whether it kept its own."""
        ctx, pool = self.ctx, self._pool
        probe_idx = None
        if self.opt.match_on == "original":
            probe_idx = self._pick(ctx.encode_views(pixels=batch.pixels)[0])
        picked: dict[str, torch.Tensor] = {}

        def plan(clip: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            img = clip.encode_image(ctx.prepare_pixels(pixels), normalize=True)
            txt = None if own is not None else clip.encode_text(tokens.to(ctx.device), normalize=True)
            tested = own if own is not None else txt.detach().float()
            idx = probe_idx if probe_idx is not None else self._pick(img.detach().float())
            rank = self._pick_rank(tested, idx)
            agree = self._agreement_now(rank, img.detach(), tested, idx, clip.logit_scale.detach().exp())
            keep = self._kept_rows(agree, batch.indices).to(ctx.device)
            picked.update(idx=idx, rank=rank, agree=agree, keep=keep)
            if txt is None:
                text_tokens = torch.where(keep.unsqueeze(1), tokens.to(ctx.device), pool.payload[idx].to(ctx.device))
                txt = clip.encode_text(text_tokens, normalize=True)
            return img, txt, clip.logit_scale.exp()

        img, txt, scale = ctx.forward_plan(plan)
        return (img.float(), txt.float(), scale.float(), picked["idx"], picked["rank"], picked["agree"],
                picked["keep"])

    def _push(self, txt: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append this (global) batch's augmented-caption embeddings, dropping the oldest."""
        d = self.ctx.dist
        self._pool.push(all_gather_nograd(txt.detach().contiguous(), d),
                        all_gather_nograd(tokens.contiguous(), d))

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = self._pool.state_tensors("caption_pool")
        if self.opt.keep_own_streak > 1:
            out["keep_own_streak"] = self._streak.clone()
        if self.opt.plain_trains_kept:  # the plain epochs after a pool epoch train on its decisions
            out["kept_own"] = self._kept.to(torch.uint8)
            out["agreement"] = self._agreement.clone()
        if self._patterned is not None:
            out["patterned"] = self._patterned.to(torch.uint8)
        if self._failures is not None:
            out["keep_test_failures"] = self._failures.clone()
        return out

    def state_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.opt.align_before_pool is not None:
            # the gate decides from the plain epoch before a pool epoch: a resumed run needs its loss
            out.update(aligned_at=self._aligned_at, plain_loss=self._plain.state())
        if self._tracks_match_epoch:
            out["match_epoch"] = self._match_epoch
        return out

    @property
    def _tracks_match_epoch(self) -> bool:
        """Whether a resumed run needs the latest pool epoch's number (its plain epochs depend on it)."""
        return (self.opt.plain_trains_kept or self.opt.plain_views.endswith("-after-pool")
                or self.opt.pattern_z is not None)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._pool.load_state(tensors, "caption_pool")
        if self.opt.align_before_pool is not None and "plain_loss" in meta:
            self._aligned_at = meta.get("aligned_at")
            self._plain.load(meta["plain_loss"])
        if self.opt.keep_own_streak > 1 and "keep_own_streak" in tensors:
            self._streak = tensors["keep_own_streak"].long().cpu().clone()
        if self.opt.plain_trains_kept and "kept_own" in tensors:
            self._kept = tensors["kept_own"].bool().cpu().clone()
            self._agreement = tensors["agreement"].float().cpu().clone()
        if self.opt.pattern_z is not None and "patterned" in tensors:
            self._patterned = tensors["patterned"].bool().cpu().clone()
        if self._failures is not None and "keep_test_failures" in tensors:
            self._failures = tensors["keep_test_failures"].long().cpu().clone()
        if self._tracks_match_epoch:
            self._match_epoch = meta.get("match_epoch")
