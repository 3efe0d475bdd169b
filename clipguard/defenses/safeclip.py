"""SafeCLIP (Yang, Gao, Mirzasoleiman, ICML 2024, Alg. 1) as one strategy of the one trainer.

Phases by epoch (0-based e):
  e < r                       unimodal NNCLR on images and on texts (the towers never meet);
  r <= e < r + c              CLIP loss on all clean pairs at lr_low (c = 1 in the paper);
  e >= r + c                  mixed: at each epoch start the clean-pair similarities are
                              (re)computed and the safe set chosen (GMM + threshold the first
                              time, then the top m% with m += s); the step loss is
                              CLIP(augmented safe pairs) + unimodal NN loss on risky pairs.
The manifest is never seen here: diagnostics read ``pair_scores()``/``selected()`` only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from clipguard.data.augment import Views
from clipguard.data.signatures import GRID
from clipguard.defenses import DEFENSES
from clipguard.defenses.alignment import ChanceMonitor
from clipguard.defenses.nn_pool import NNPool, nn_contrastive_loss, nn_self_loss, nn_target_loss
from clipguard.defenses.pair_scores import (
    dense_inliers,
    embed_dim,
    inlier_fraction,
    outlier_tail,
    repeated_images,
    shard_pair_scores,
)
from clipguard.defenses.pattern_veto import PatternVeto
from clipguard.defenses.split import SafeSetSchedule, fit_gmm, rescored_first, top_fraction_mask
from clipguard.errors import ConfigError
from clipguard.options import Options, require
from clipguard.training.context import Batch, TrainContext, step_seed
from clipguard.training.distributed import all_gather_nograd, broadcast_object
from clipguard.training.losses import clip_loss, own_caption_unlearning, small_loss_clip_loss
from clipguard.training.schedule import Schedule, Segment
from clipguard.training.strategy import PairSelector, Strategy

log = logging.getLogger("clipguard")

PHASES = ("unimodal", "clip_low", "mixed")
# density_score -> what a pair's log k-distance is measured against (pair_scores._log_kdist)
DENSITY_RELATIVE_TO = {"global": "all", "local": "neighbours", "caption": "captions"}
# What the CLIP loss sees of a safe pair (safe_image_augment / safe_text_augment). The paper:
# SimCLR views and EDA captions. "crop-flip" keeps only SimCLR's geometric part; "none", the
# pair itself. Risky pairs' unimodal views always use SimCLR + EDA: that loss needs strong views.
# How Eq. 4's two parts are added in a step (loss_weighting). "terms": each averaged over its own
# rows and summed (a risky pair then weighs safe/risky times a safe pair: ~9x at a 90% safe
# set). "pairs": each term weighted by its share of the global batch, so every pair counts the same.


@dataclass
class SafeClipOptions(Options):
    """SafeCLIP's settings. The defaults were chosen on validation data (docs/defenses.md, "How
    the defaults were chosen"); ``None`` means "sized from the run" (see ``plan``). The paper's
    exact settings are configs/safeclip-paper.yaml."""

    kind: ClassVar[str] = "defense 'safeclip'"
    warmup_epochs: int | None = 0  # r: unimodal NNCLR epochs (None: 10% of the epochs, 1 to 5)
    # CLIP loss on all pairs before the first split, at the low lr (None: 1). A run too short to
    # leave one mixed epoch after them gets fewer, with a warning
    clip_warmup_epochs: int | None = 4
    # with no unimodal epochs (warmup_epochs 0), where the run's lr warm-up goes: the start of the
    # mixed phase (False), or the start of the CLIP epochs before the first split (True), so that a
    # CLIP epoch at the base lr (lr_low_factor 1) does not start a fresh model at its peak lr
    clip_lr_warmup: bool = field(default=True, metadata={"neutral": False})
    # the CLIP epochs before the first split on augmented pairs: SimCLR views with this minimum
    # crop and EDA captions (None: the pairs as they are). Augmentations slow down how fast a
    # trigger is learnt more than how fast the clean pairs align (the augmented-CLIP screen,
    # docs/defenses.md), so the first split may rank the poisons before the model has learnt them
    clip_warmup_crop_min: float | None = field(default=0.5, metadata={"neutral": None})
    # the share of each step's pairs, those with the lowest own CLIP loss, that train in the CLIP
    # epochs before the first split (None: every pair). A pair whose caption does not fit its image
    # keeps a high loss while the clean pairs align, so it is left out before the model learns it
    # (small-loss selection, as in learning with noisy labels); the chance monitor still reads the
    # whole batch's loss
    clip_warmup_keep: float | None = field(default=None, metadata={"neutral": None})
    lr_low: float = 5e-6              # the low lr when lr_low_factor is None (the paper's)
    lr_low_factor: float | None = 1.0  # the low lr as a fraction of the base lr
    # where the mixed phase's cosine starts, as a multiple of the base lr. A trigger learnt in the
    # CLIP epochs before the first split is only unlearnt by the mixed epochs that follow; in
    # fine-tuning, how much of a backdoor clean training removes depends steeply on the lr
    # (docs/finetuning.md), so a larger first step after the split may unlearn more
    mixed_lr_factor: float = field(default=1.0, metadata={"neutral": 1.0})
    threshold: float = 0.9            # t on p_clean for the first split
    step: float | None = None         # s: growth of the safe fraction per epoch (None: sized by the budget)
    # how big the safe set may grow: "schedule" (the paper: +step per epoch up to max_safe_fraction);
    # "outlier": also never past the pairs whose score is within outlier_z robust standard
    # deviations below the median (re-measured every epoch); "mixture": never past the re-fitted
    # mixture's high-component weight minus mixture_margin. "schedule" since the fifty-first round:
    # the outlier ceiling kept the model's own mistakes out of the CLIP loss for good (2.1 zero-shot
    # points on 55,000-pair validation rows), and was needed only where the pattern veto's caption groups
    # were too small to see a trigger (4,000 pairs); with pattern_group_pairs every backdoor stayed
    # within its bound at every size validated (docs/safeclip-selection.md, forty-ninth and fifty-first rounds)
    safe_size: Literal["schedule", "outlier", "mixture"] = "schedule"
    outlier_z: float = 3.0
    # whether the ceiling may take the safe set below the size it has reached (True) or only stop
    # its growth (False: m never falls). On clean 60,000-pair validation rows at 20 epochs the
    # outlier ceiling fell from 0.86 to 0.80 as the pairs kept out drifted to lower scores, and the
    # safe set shrank with it (docs/safeclip-selection.md, after the forty-seventh round). Not
    # measured as a candidate yet
    safe_set_shrinks: bool = field(default=True, metadata={"neutral": True})
    # with safe_size outlier: the tail pairs below the ceiling that may still enter the safe set, by
    # their pattern z-score (the pattern veto's, computed at the same split): a tail pair whose image
    # shares its caption group's riskiest pattern by at most this many robust standard deviations is
    # let in as the set grows, one above it stays out (None: the ceiling keeps the whole tail out).
    # The tail holds the model's own mistakes (no shared pattern) and the poisons a small dataset's
    # pattern veto flags only in part: on a 4,000-pair validation model 98% of BadNet's tail pairs
    # score above 1, 26-39% of the clean tail's (docs/safeclip-selection.md, forty-ninth round). Not a
    # default: at 1 it let BadNet in on one of three 4,000-pair validation seeds (fiftieth round)
    tail_pattern_z: float | None = field(default=None, metadata={"neutral": None, "only_with": "pattern_z"})
    mixture_margin: float = 0.05
    max_safe_fraction: float = 1.0
    min_initial_fraction: float = 0.2  # the first safe set holds at least this share
    max_initial_fraction: float = 0.3  # the first safe set holds at most this share (the paper: 1)
    efficient_update: bool = True     # re-score only the top pairs by previous score
    update_fraction: float = 0.3
    update_margin: float = 0.1
    # where a split update (the second split on) gets the features of the pairs it re-scores:
    # "encode", every candidate encoded again at the epoch's start; "steps", a safe pair's from the
    # previous mixed epoch's own forward (its image and caption as they are, encoded just before
    # its step; needs safe_image_augment and safe_text_augment none), a pair out for good keeps its
    # last features, and only the other candidates are encoded (an update of 1.2-1.6 s instead of
    # 2.8-3.0 s on the 10,000-pair validation grid). Not a default: the features are up to an epoch
    # old, the density veto reads their mix as sparser and keeps more pairs out for good, which
    # cost 0.6-1.2 zero-shot points on validation (docs/safeclip-selection.md, thirty-second round)
    update_features: Literal["encode", "steps"] = field(default="encode", metadata={"neutral": "encode"})
    # how an efficient update ranks the pairs it did not re-score (the riskiest of the last split)
    # against those it did: "together", by their last scores, given by the model as it was an epoch
    # or more before (after a mixed epoch the re-scored pairs score lower on the whole, and on
    # 4,000-pair validation rows a third of the next safe set were pairs not re-scored, with most of
    # the poisons it held); "rescored-first", below every re-scored pair, in their own order, for the
    # safe set and for the pattern veto's suspects (the paper re-evaluates the pairs of high
    # similarity because the next set is to come from them). Not a default: on validation it cost
    # zero-shot accuracy and the poisons entered from the re-scored pairs instead (forty-seventh round)
    update_ranks: Literal["together", "rescored-first"] = field(default="together", metadata={"neutral": "together"})
    # which pairs an update may take into the safe set: "ranking", the top m% of this split's
    # scores; "consensus", only those also in the top m% of the last split's scores, so a pair must
    # rank high at two splits in a row. On 4,000-pair validation rows the first mixed epoch blurs the
    # ranking (the split's AUROC falls from 0.81-0.84 to 0.71-0.80); of the first update's Blended
    # pairs 18 of 24 were pairs the first split ranked low (of its SIG pairs 5 of 16). Not a default:
    # there it cost zero-shot accuracy and SIG's pairs still got in (forty-eighth round)
    update_entry: Literal["ranking", "consensus"] = field(default="ranking", metadata={"neutral": "ranking"})
    rank_by: Literal["similarity", "p_clean", "relative"] = "relative"  # relative: see shard_similarities
    reference_captions: int = 1024    # relative: captions sampled (per epoch) to compare each image with
    reference_top_k: int = 10
    # the joint-density veto: a pair whose joint (image, caption) embedding has its density_k-th
    # nearest neighbour (among density_reference sampled pairs) more than density_z robust standard
    # deviations farther than the median pair's stays out of the safe set (None: no veto). 2 since
    # the forty-fourth round: behind the pattern veto and its unlearning a looser density veto keeps
    # about half as many clean pairs out for good (docs/safeclip-selection.md); 1 before it
    density_z: float | None = 2.0
    # a pair vetoed in a mixed epoch after the first stays vetoed: once the model has begun to
    # learn a poison, the poison gains look-alikes and a high score, so a later verdict is worth
    # less than an earlier one (the first split's, made by a barely aligned model, is not kept)
    density_memory: bool = True
    # how many vetoes (from the second split on) make a pair's exclusion final under
    # density_memory: 1, every pair vetoed once stays out (the union of every epoch's verdicts);
    # 2, a pair vetoed once misses only that epoch and stays out from its second veto on, so a
    # verdict that flickers with the sampled reference does not exclude a pair for good. 2 since the
    # forty-fifth round: behind the pattern veto, a third fewer clean pairs out for good bought 1.1
    # zero-shot points at 20 epochs on the test grid (docs/safeclip-selection.md); 1 before it
    density_strikes: int = field(default=2, metadata={"neutral": 1, "only_with": "density_z"})
    # whether the pattern veto's flags count as strikes of the density memory (True) or keep a pair
    # out only while it is flagged (False). On clean 60,000-pair validation rows most of the 4,280
    # pairs out for good after 20 epochs were there on the pattern veto's flags. Not measured as a
    # candidate yet
    pattern_strikes: bool = field(default=True, metadata={"neutral": True})
    # how many splits after the first have verdicts that count towards density_strikes (None:
    # every split). A later verdict keeps its pair out of that epoch's safe set only. Under a memory
    # of every split the union of verdicts grows over training (41-45% of MNIST's pairs out for good
    # by epoch 10); 1 halves it for 2 points of zero-shot there, and let Blended through on
    # Fashion-MNIST (docs/safeclip-selection.md, seventeenth and eighteenth rounds)
    density_memory_splits: int | None = field(default=None, metadata={"neutral": None})
    density_k: int = 16
    density_reference: int = 16384
    # what the veto compares: "global", the pair's log k-distance against every pair's;
    # "local", against its own k neighbours' (a local density ratio, as SLOF); "caption", against
    # the median of the density_caption_k sampled pairs whose captions are nearest its own (a
    # poison is measured against the clean pairs of the caption it carries). With "global" a
    # class of diverse images (Fashion-MNIST's shirts) is sparse everywhere and can be vetoed
    # whole, and a class that never gets the CLIP loss costs zero-shot accuracy
    density_score: Literal["global", "local", "caption"] = field(default="global", metadata={"neutral": "global"})
    density_caption_k: int = field(default=64, metadata={"neutral": 64})
    # "image": a pair the density veto flags is let through when it is no sparser than the pairs
    # whose images are nearest its own (its log k-distance within density_z robust standard
    # deviations of their median, over density_given_k of them). A rare image (Fashion-MNIST's
    # shirts, 63-69% of them vetoed for good at 20 epochs) is sparse with any caption; a poison's
    # caption is unlike those of the images it looks like. The veto then estimates how unlikely
    # the caption is given the image, not how rare the pair is. "none": the veto as it is. Not a
    # default: once a trigger is partly learnt, the triggered images are each other's nearest and
    # spare each other (MNIST validation, BadNet 5.2% against 3.1%; docs/safeclip-selection.md, 24th round)
    density_given: Literal["none", "image"] = field(default="none", metadata={"neutral": "none"})
    density_given_k: int = field(default=64, metadata={"neutral": 64})
    # the repeated-image veto: a pair whose image has repeat_k near-identical copies (the log
    # distance to its repeat_k-th nearest image, among the density_reference sample, more than
    # repeat_z robust standard deviations below the median) stays out of the safe set, as
    # targeted poisoning repeats its target image under many captions (None: no veto); with
    # density_memory, a verdict from the second split on is final, as the density veto's
    repeat_z: float | None = 4.0
    repeat_k: int = 4
    # where the repeated-image veto looks for copies: the model's image embedding, or coarse
    # pixel signatures (each image averaged over repeat_grid x repeat_grid blocks, minus its mean
    # grey level), which copies with their own added noise cannot leave (docs/threat-model.md)
    repeat_space: Literal["embedding", "pixels"] = field(default="embedding",
                                                         metadata={"neutral": "embedding"})
    repeat_grid: int = field(default=GRID, metadata={"neutral": GRID})
    # what the CLIP loss gets of a risky pair: nothing ("none", the paper), or its image with the
    # mean caption embedding of the risky_clip_k nearest safe images ("neighbours": from a pool of
    # recent safe pairs, looked up with the un-augmented image; the pair's own caption is never
    # used). A clean risky pair then still aligns its image with captions of what it shows, and a
    # poisoned one is pulled towards those captions instead of the attacker's
    risky_clip: Literal["none", "neighbours"] = field(default="none", metadata={"neutral": "none"})
    risky_clip_k: int = field(default=8, metadata={"neutral": 8})
    # the risky pairs' images as extra negatives of the safe captions in the CLIP term (caption to
    # image only). A trigger learnt before the first split ties poisoned images to their target's
    # caption; without this, nothing in a mixed epoch pulls them apart, as the safe set holds few
    # of them. The price: a clean risky image is pushed from the captions of its own class. On by
    # default since the forty-fourth round
    risky_negatives: bool = field(default=True, metadata={"neutral": False})
    # the pattern veto (defenses/pattern_veto.py): a pair whose high-passed image carries the
    # pattern shared by the pattern_share riskiest pairs of its caption group (pattern_clusters
    # groups, k-means on the captions) by more than pattern_z robust standard deviations stays out
    # of the safe set, counted with the density veto's memory. It reads pixels, which a learnt
    # trigger cannot move (None: no veto; 3, the scan's own cut, since the forty-fourth round)
    pattern_z: float | None = field(default=3.0, metadata={"neutral": None})
    pattern_share: float = field(default=0.1, metadata={"neutral": 0.1, "only_with": "pattern_z"})
    pattern_clusters: int = field(default=50, metadata={"neutral": 50, "only_with": "pattern_z"})
    # the pairs each caption group holds on average: fewer than pattern_clusters groups on data too
    # small for that many (None: always pattern_clusters). A group's pattern is the mean of its
    # suspects' images, too noisy to see a faint trigger when a group holds a few dozen pairs. 400
    # since the fifty-first round, with no ceiling on the safe set (safe_size schedule): at 4,000 pairs
    # the veto then flags 88-100 of a BadNet's 100 pairs from the fourth mixed epoch on (50 groups:
    # 21-71); from 20,000 pairs on it changes nothing (50 groups either way). Under the outlier
    # ceiling it cost zero-shot accuracy at 4,000 pairs (forty-sixth round)
    pattern_group_pairs: int | None = field(default=400, metadata={"neutral": None, "only_with": "pattern_z"})
    # what a partial update's pattern veto keeps out (efficient_update): "fresh", the pairs it flags
    # itself; "full", those and the pairs the last split that scored every pair flagged. A partial
    # update's suspects come from a ranking of fresh and older scores, and at the first ones after
    # the first split the veto flagged 0-42 of a Blended's or SIG's 100 pairs where the splits around
    # them flagged 65-99 (docs/safeclip-selection.md, fifty-second round)
    pattern_partial: Literal["fresh", "full"] = field(default="fresh",
                                                      metadata={"neutral": "fresh", "only_with": "pattern_z"})
    # with the pattern veto: the weight of a term that unlearns the pattern-flagged pairs in mixed
    # steps (their image pushed below the batch's mean caption score for its own caption,
    # losses.own_caption_unlearning). A trigger learnt in the CLIP epochs before the first split
    # otherwise stays, and grows, though no flagged pair trains with the CLIP loss again
    # (docs/safeclip-selection.md, thirty-seventh round). None: no such term; without the pattern
    # veto it does nothing. 0.05 above pattern_unlearn_z 4 since the forty-fourth round
    pattern_unlearn: float | None = field(default=0.05, metadata={"neutral": None, "only_with": "pattern_z"})
    # whether the unlearning term also moves the captions (True) or only the flagged images (False:
    # a clean pair the veto flags then cannot pull its class's captions away from that class)
    pattern_unlearn_text: bool = field(default=True, metadata={"neutral": True, "only_with": "pattern_unlearn"})
    # the pattern z-score above which a flagged pair is unlearnt (None: pattern_z, every vetoed
    # pair). Higher: fewer clean pairs unlearnt, and fewer of a faint trigger's (docs/safeclip-selection.md,
    # fortieth round)
    pattern_unlearn_z: float | None = field(default=4.0, metadata={"neutral": None, "only_with": "pattern_unlearn"})
    pool_size: int | None = None      # NN pool of each modality (None: a fifth of the data, at most 16,384)
    temperature: float = 0.1
    # the unimodal loss's second view: with gradient and the loss symmetrised as in NNCLR (True),
    # or encoded without gradient, as the target whose pool neighbour the first view must pick
    # (False: about a third less compute per risky pair; on validation it cost 2-3 points of
    # zero-shot and let BadNet back in on some seeds, docs/safeclip-selection.md, fifth round)
    second_view_grad: bool = True
    # what a mixed epoch trains the risky pairs on: the unimodal NNCLR loss of Eq. 4 on two views of
    # each image and caption ("unimodal", the paper); the same loss on one view ("one-view": the
    # view's own pool neighbour is its positive among the batch's views, so no second view is
    # encoded and a mixed step costs about a CLIP step); or nothing ("none": they leave the step's
    # loss). On validation, at 10 epochs, "none" cost 1.0-1.2 points of zero-shot and "one-view"
    # 0.7-2.1 (docs/safeclip-selection.md, thirty-first and thirty-second rounds)
    risky_loss: Literal["unimodal", "one-view", "none"] = field(default="unimodal", metadata={"neutral": "unimodal"})
    safe_image_augment: Literal["simclr", "crop-flip", "none"] = "none"  # the paper: simclr
    safe_text_augment: Literal["eda", "none"] = "none"                   # the paper: eda
    # how many mixed epochs, from the first split on, train the safe pairs on the views above (None:
    # every mixed epoch); later ones train them as they are. Meant to slow down how fast a trigger
    # the early splits admit is learnt, so that the next splits' veto still sees it; on MNIST's
    # validation rows it let BadNet through (docs/safeclip-selection.md, eighteenth round)
    safe_augment_epochs: int | None = field(default=None, metadata={"neutral": None})
    loss_weighting: Literal["terms", "pairs"] = "pairs"                  # the paper: terms
    # the smallest random crop of the views (risky pairs' unimodal loss, and the safe pairs' with
    # safe_image_augment). The paper (SimCLR): 0.08. 0.5 since the twenty-sixth validation round:
    # a risky pair never meets its caption, so milder views cost its image less. It passed that
    # round's rule on every validation grid (docs/safeclip-selection.md); the test grids measured it after
    crop_scale_min: float = 0.5
    eda_alpha: float = 0.1
    eda_p_delete: float = 0.1
    gmm_seed: int = 0

    def validate(self) -> None:
        require((self.warmup_epochs or 0) >= 0 and (self.clip_warmup_epochs or 0) >= 0,
                "warmup_epochs and clip_warmup_epochs must be >= 0")
        require(self.lr_low > 0, f"lr_low must be > 0, got {self.lr_low}")
        require(self.mixed_lr_factor > 0, f"mixed_lr_factor must be > 0, got {self.mixed_lr_factor}")
        require(self.lr_low_factor is None or 0 < self.lr_low_factor <= 1,
                f"lr_low_factor must be in (0, 1], got {self.lr_low_factor}")
        require(self.step is None or 0.0 <= self.step <= 1.0, f"step must be in [0, 1], got {self.step}")
        require(0.0 <= self.mixture_margin < 1.0, f"mixture_margin must be in [0, 1), got {self.mixture_margin}")
        require(self.outlier_z > 0, f"outlier_z must be > 0, got {self.outlier_z}")
        require(self.tail_pattern_z is None or (self.safe_size == "outlier" and self.pattern_z is not None),
                "tail_pattern_z lets the outlier rule's tail in by its pattern z-score, so it needs "
                f"safe_size: outlier and the pattern veto (pattern_z), got safe_size {self.safe_size!r}, "
                f"pattern_z {self.pattern_z}")
        require(0.0 < self.update_fraction <= 1.0, f"update_fraction must be in (0, 1], got {self.update_fraction}")
        require(0.0 <= self.update_margin <= 1.0, f"update_margin must be in [0, 1], got {self.update_margin}")
        require(self.pool_size is None or self.pool_size >= 1, f"pool_size must be >= 1, got {self.pool_size}")
        require(self.reference_captions >= 1 and self.reference_top_k >= 1,
                "reference_captions and reference_top_k must be >= 1")
        require(self.density_z is None or self.density_z > 0,
                f"density_z must be > 0 (or None: no density veto), got {self.density_z}")
        require(self.density_strikes >= 1, f"density_strikes must be >= 1, got {self.density_strikes}")
        require(self.density_memory_splits is None or self.density_memory_splits >= 1,
                f"density_memory_splits must be >= 1 (or None: every split), got {self.density_memory_splits}")
        require(self.density_k >= 1 and self.density_reference >= 2,
                "density_k must be >= 1 and density_reference >= 2")
        require(self.repeat_z is None or self.repeat_z > 0,
                f"repeat_z must be > 0 (or None: no repeated-image veto), got {self.repeat_z}")
        require(self.repeat_k >= 1, f"repeat_k must be >= 1, got {self.repeat_k}")
        require(self.density_score in DENSITY_RELATIVE_TO,
                f"density_score must be one of {', '.join(DENSITY_RELATIVE_TO)}, got {self.density_score!r}")
        require(self.density_caption_k >= 1, f"density_caption_k must be >= 1, got {self.density_caption_k}")
        require(self.density_given_k >= 1, f"density_given_k must be >= 1, got {self.density_given_k}")
        require(self.repeat_space in ("embedding", "pixels"),
                f"repeat_space must be 'embedding' or 'pixels', got {self.repeat_space!r}")
        require(self.repeat_grid >= 1, f"repeat_grid must be >= 1, got {self.repeat_grid}")
        require(self.repeat_space == "embedding" or self.repeat_z is not None,
                "repeat_space: pixels needs the repeated-image veto on (repeat_z)")
        require(self.repeat_grid == GRID or self.repeat_space == "pixels",
                "repeat_grid applies to repeat_space: pixels only")
        require(self.clip_warmup_crop_min is None or 0.0 < self.clip_warmup_crop_min <= 1.0,
                f"clip_warmup_crop_min must be in (0, 1] (or None: no views), got {self.clip_warmup_crop_min}")
        require(self.clip_warmup_keep is None or 0.0 < self.clip_warmup_keep <= 1.0,
                f"clip_warmup_keep must be in (0, 1] (or None: every pair), got {self.clip_warmup_keep}")
        require(self.safe_augment_epochs is None or self.safe_augment_epochs >= 1,
                f"safe_augment_epochs must be >= 1 (or None: every mixed epoch), got {self.safe_augment_epochs}")
        require(self.pattern_z is None or self.pattern_z > 0,
                f"pattern_z must be > 0 (or None: no pattern veto), got {self.pattern_z}")
        require(0.0 < self.pattern_share < 1.0, f"pattern_share must be in (0, 1), got {self.pattern_share}")
        require(self.pattern_clusters >= 1, f"pattern_clusters must be >= 1, got {self.pattern_clusters}")
        require(self.pattern_group_pairs is None or self.pattern_group_pairs >= 1,
                f"pattern_group_pairs must be >= 1 (or None: pattern_clusters groups), got {self.pattern_group_pairs}")
        require(self.pattern_unlearn is None or self.pattern_unlearn > 0,
                f"pattern_unlearn must be > 0 (or None: no unlearning term), got {self.pattern_unlearn}")
        require(self.pattern_unlearn_z is None or self.pattern_unlearn_z > 0,
                f"pattern_unlearn_z must be > 0 (or None: pattern_z), got {self.pattern_unlearn_z}")
        require(self.risky_clip_k >= 1, f"risky_clip_k must be >= 1, got {self.risky_clip_k}")
        require(not (self.risky_negatives and self.risky_clip == "neighbours"),
                "risky_negatives (on by default) needs risky_clip: none, as with neighbours every risky image "
                "is a positive: with risky_clip: neighbours set risky_negatives: false")
        require(self.risky_loss != "none" or self.warmup_epochs == 0,
                "risky_loss: none leaves the unimodal warm-up nothing to train; set warmup_epochs 0")
        require(self.risky_loss != "none" or self.risky_clip == "none",
                "risky_loss: none drops the risky pairs from the step; risky_clip: neighbours trains them")
        require(self.update_features == "encode" or (self.safe_image_augment == "none"
                                                     and self.safe_text_augment == "none"),
                "update_features: steps reuses the safe pairs' features as the step encoded them, so it needs "
                "safe_image_augment: none and safe_text_augment: none")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(0.0 < self.crop_scale_min <= 1.0, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        require(0.0 <= self.eda_alpha <= 1.0 and 0.0 <= self.eda_p_delete <= 1.0,
                "eda_alpha and eda_p_delete must be in [0, 1]")
        self.sizer(0.01)  # the safe-set schedule checks its own fractions

    @property
    def requested_clip_epochs(self) -> int:
        """The CLIP epochs before the first split that the options ask for (``plan`` may give a
        short run fewer)."""
        return self.clip_warmup_epochs if self.clip_warmup_epochs is not None else 1

    def plan(self, epochs: int) -> tuple[int, int, float]:
        """(unimodal epochs, low-lr CLIP epochs, growth per epoch) for a run of ``epochs``.

        Unset values scale with the budget the way the paper's do at CC3M: about a tenth of
        training warms up unimodally (5 of 32-48 epochs), one epoch at the low lr, and the safe
        set reaches its size within about a third of the mixed epochs. The CLIP epochs before the
        first split shrink, down to one, until a mixed epoch follows them (``bind`` warns)."""
        r = self.warmup_epochs if self.warmup_epochs is not None else min(5, max(1, round(0.1 * epochs)))
        c = self.requested_clip_epochs
        if c > 1 and epochs - r - c < 1:
            c = max(1, epochs - r - 1)
        mixed = max(1, epochs - r - c)
        s = self.step if self.step is not None else min(0.25, max(0.01, 3.0 / mixed))
        return int(r), int(c), float(s)

    def sizer(self, step: float) -> SafeSetSchedule:
        return SafeSetSchedule(self.threshold, step, self.max_safe_fraction,
                               self.min_initial_fraction, self.max_initial_fraction)


@DEFENSES.register("safeclip")
class SafeClip(Strategy, PairSelector):
    """Warm up unimodally, then train CLIP only on a growing safe set of high-similarity pairs."""

    name = "safeclip"
    options_class = SafeClipOptions

    def __init__(self, options: SafeClipOptions | None = None):
        super().__init__(options)
        o = self.opt
        self._plan: tuple[int, int, float] | None = None  # (r, c, step), sized in bind from the epochs
        self._sizer: SafeSetSchedule | None = None
        self._views = Views(crop_scale_min=o.crop_scale_min, eda_alpha=o.eda_alpha, eda_p_delete=o.eda_p_delete)
        self._warm_views = (Views(crop_scale_min=o.clip_warmup_crop_min, eda_alpha=o.eda_alpha,
                                  eda_p_delete=o.eda_p_delete) if o.clip_warmup_crop_min is not None else None)
        # state that survives a resume
        self._m: float | None = None            # current safe fraction (None before the first split)
        self._safe: torch.Tensor | None = None  # bool (N,), the safe set of this epoch
        self._sims: torch.Tensor | None = None  # float (N,), latest clean-pair similarities
        self._dense: torch.Tensor | None = None  # bool (N,), pairs the density veto lets through
        self._dense_rounds = 0                   # splits made with the density veto so far
        self._strikes: torch.Tensor | None = None  # uint8 (N,), vetoes from the second split on
        self._safe_pool: NNPool | None = None      # risky_clip: neighbours (made in bind)
        # update_features: steps (made in bind): every pair's last features (image, text; fp16) and
        # whether a mixed step of this epoch refreshed them
        self._step_feats: torch.Tensor | None = None
        self._step_fresh: torch.Tensor | None = None
        self._patterned: torch.Tensor | None = None  # bool (N,), the pattern veto's flags this epoch
        self._full_patterned: torch.Tensor | None = None  # its flags at the last split that scored every pair
        self._unlearnt: torch.Tensor | None = None  # bool (N,), the pairs pattern_unlearn unlearns this epoch
        self._pattern = (PatternVeto(o.pattern_z, o.pattern_share, o.pattern_clusters, o.gmm_seed,
                                     o.pattern_group_pairs)
                         if o.pattern_z is not None else None)

    # ------------------------------------------------------------------ phases and lr
    def phase(self, epoch: int) -> str:
        r, c, _ = self._require_plan()
        if epoch < r:
            return "unimodal"
        if epoch < r + c:
            return "clip_low"
        return "mixed"

    def _require_plan(self) -> tuple[int, int, float]:
        if self._plan is None:
            raise RuntimeError("safeclip: the phases are sized when the strategy is bound to a run")
        return self._plan

    def low_lr(self, base_lr: float) -> float:
        return base_lr * self.opt.lr_low_factor if self.opt.lr_low_factor is not None else self.opt.lr_low

    def bind(self, ctx: TrainContext) -> None:
        super().bind(ctx)
        self._aligned = ChanceMonitor()  # the CLIP loss of the last slow CLIP epoch, fresh for each run
        r, c, step = self._plan = self.opt.plan(ctx.epochs)
        self._sizer = self.opt.sizer(step)
        if ctx.epochs <= r + c:  # before the warning below, which would promise a run that cannot happen
            raise ConfigError(f"safeclip needs more than warmup_epochs + clip_warmup_epochs = "
                              f"{r + c} epochs to reach its mixed phase; got --epochs {ctx.epochs}")
        if c < self.opt.requested_clip_epochs:
            log.warning("safeclip: a %d-epoch run leaves no mixed epoch after clip_warmup_epochs = %d; "
                        "training %d CLIP epoch(s) before the first split instead", ctx.epochs,
                        self.opt.requested_clip_epochs, c)
        import sklearn.mixture  # noqa: F401  (imported now so the split's timing is the fit, not the import)

        dim = embed_dim(ctx.raw_model)
        if not hasattr(self, "_img_pool"):
            size = self.opt.pool_size or min(16384, max(1, len(ctx.data) // 5))
            size = min(size, len(ctx.data))
            self._img_pool = NNPool(size, dim).to(ctx.device)
            self._txt_pool = NNPool(size, dim).to(ctx.device)
            # safe pairs' image embeddings with their caption embeddings (risky_clip: neighbours)
            self._safe_pool = (NNPool(size, dim, payload_shape=(dim,), payload_dtype=torch.float32).to(ctx.device)
                               if self.opt.risky_clip == "neighbours" else None)
        if self.opt.update_features == "steps" and self._step_feats is None:
            self._step_feats = torch.zeros(len(ctx.data), 2 * dim, dtype=torch.float16)
            self._step_fresh = torch.zeros(len(ctx.data), dtype=torch.bool)

    def schedule(self, ctx: TrainContext, warmup: int, min_lr: float) -> Schedule:
        """Unimodal epochs: warm-up then constant base lr; CLIP warm-up: constant lr_low;
        mixed epochs: a fresh cosine from the base lr (times ``mixed_lr_factor``) down to ``min_lr``
        at the very last step.
        The run's warm-up opens the first phase that has one: the unimodal epochs, else the mixed
        phase, or the CLIP epochs with ``clip_lr_warmup``.

        Each phase is its own segment indexed by the global step, so the lr can never fall to
        zero and rise again inside a phase (the reference code's misindexed cosine did)."""
        spe = ctx.steps_per_epoch
        r, c, _ = self._require_plan()
        mixed = ctx.epochs - r - c
        segs: list[Segment] = []
        if r:
            segs.append(Segment(r * spe, ctx.base_lr, min(warmup, r * spe - 1), None))
        early = not r and self.opt.clip_lr_warmup  # the warm-up opens the CLIP epochs instead
        if c:
            segs.append(Segment(c * spe, self.low_lr(ctx.base_lr), min(warmup, c * spe - 1) if early else 0, None))
        if mixed > 0:
            w = 0 if r or (early and c) else min(warmup, mixed * spe - 1)
            segs.append(Segment(mixed * spe, ctx.base_lr * self.opt.mixed_lr_factor, w, min_lr))
        return Schedule(segs)

    # ------------------------------------------------------------------ the split
    def _candidates(self, n: int) -> tuple[torch.Tensor, bool]:
        """Pairs to re-evaluate: all, or the top max(q, m + margin) by the previous similarity."""
        if not self.opt.efficient_update or self._sims is None or self._m is None:
            return torch.arange(n), True
        frac = min(1.0, max(self.opt.update_fraction, self._sizer.grow(self._m) + self.opt.update_margin))
        if frac >= 1.0:
            return torch.arange(n), True
        idx = torch.nonzero(top_fraction_mask(self._sims, frac)).flatten()
        return idx, False

    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        ph = self.phase(epoch)
        rec: dict[str, Any] = {"phase": ph}
        if ph != "mixed":
            self._safe = self._patterned = self._unlearnt = None
            self._aligned.reset()
            return rec
        ratio = self._aligned.check(
            self.ctx, f"safeclip: the first split (epoch {epoch + 1})",
            "its pair scores cannot tell poisoned pairs from clean ones yet, and the first safe set is close "
            "to a random draw (docs/results.md, MNIST). More CLIP epochs before it (--opt clip_warmup_epochs=N) "
            "give the model time to align; on augmented pairs (--opt clip_warmup_crop_min=0.5, the default) "
            "they teach it a trigger more slowly than the clean pairs, on the pairs as they are about as fast. "
            "Detect-then-train with a small trusted model is the other way out (docs/safeclip-selection.md, twentieth "
            "to twenty-second rounds; docs/scan.md)")
        if ratio is not None:
            rec["clip_loss_vs_chance"] = ratio
        ctx = self.ctx
        n = len(ctx.data)
        t0 = time.perf_counter()
        cand, full = self._candidates(n)
        o = self.opt
        cache = known = None
        if self._step_feats is not None:
            cache = self._step_feats
            if self._m is not None:  # an update (the first split encodes every pair)
                known = self._step_fresh.clone()
                if o.density_memory and self._strikes is not None:  # out for good: their last features
                    known |= self._strikes >= o.density_strikes
        # the pattern veto groups the captions by this split's caption features where the split
        # encodes them now (a row's features do not depend on its batch: the same bits as the
        # veto's own encode), and encodes only the captions a partial update did not score; with
        # features kept from the steps (older features) it encodes every caption itself
        hand_text = self._pattern is not None and (known is None or not bool(known.any()))
        scores = shard_pair_scores(
            ctx, cand, self._reference(epoch), o.reference_top_k,
            density_k=o.density_k if o.density_z is not None else 0,
            density_reference=o.density_reference, seed=step_seed(ctx.seed, "safeclip-density", epoch),
            repeat_k=o.repeat_k if o.repeat_z is not None else 0,
            repeat_grid=o.repeat_grid if o.repeat_space == "pixels" else 0,
            density_relative_to=DENSITY_RELATIVE_TO[o.density_score], density_caption_k=o.density_caption_k,
            density_given_image_k=o.density_given_k if o.density_given == "image" else 0,
            cache=cache, known=known, keep_text=hand_text)
        if cache is not None:
            rec["reused_features"] = int(known[cand].sum()) if known is not None else 0
            self._step_feats[cand] = scores.features.to(self._step_feats.dtype)
            self._step_fresh.zero_()
        sims = self._sims.clone() if self._sims is not None else torch.zeros(n)
        sims[cand] = scores.score
        rescored = None  # update_ranks rescored-first: the pairs this partial update scored again
        if not full and o.update_ranks == "rescored-first":
            rescored = torch.zeros(n, dtype=torch.bool)
            rescored[cand] = True
        ranks = sims if rescored is None else rescored_first(sims, rescored)
        patterned = faint = None
        if self._pattern is not None:  # the riskiest pairs (lowest scores) estimate each group's pattern
            text = None  # None unless hand_text; rows of NaN: captions the veto encodes itself
            if scores.text is not None:
                text = torch.full((n, scores.text.shape[1]), float("nan"))
                text[cand] = scores.text
            # one scoring for every cut: the veto's, the unlearning's, the tail's (tail_pattern_z)
            cuts = [o.pattern_z]
            unlearn_cut = o.pattern_unlearn is not None and o.pattern_unlearn_z is not None
            if unlearn_cut:
                cuts.append(o.pattern_unlearn_z)
            if o.tail_pattern_z is not None:
                cuts.append(o.tail_pattern_z)
            masks = self._pattern.flags(ctx, -ranks, tuple(cuts), text)
            patterned = masks[0]
            if unlearn_cut:
                self._unlearnt = masks[1]
                rec["pattern_unlearnt"] = int(self._unlearnt.sum())
            else:  # no term, or every vetoed pair
                self._unlearnt = patterned if o.pattern_unlearn is not None else None
            if o.tail_pattern_z is not None:
                faint = masks[-1]
            if full:
                self._full_patterned = patterned
            rec["pattern_flagged"] = int(patterned.sum())
            self._patterned = patterned
        vetoes = scores.log_kdist is not None or scores.log_repeat is not None or patterned is not None
        dense = (self._veto(n, cand, scores.log_kdist, scores.log_repeat, scores.log_kdist_given_image, patterned)
                 if vetoes else None)
        if dense is not None and not full and o.pattern_partial == "full" and self._full_patterned is not None:
            # the last full split's flags stay out of the safe set too (not counted as strikes)
            rec["pattern_held"] = int((self._full_patterned & dense).sum())
            dense = dense & ~self._full_patterned
        t_sims = time.perf_counter() - t0
        decision = None
        if ctx.dist.is_main:
            decision = self._decide(sims, dense, rescored, faint)
        decision = broadcast_object(decision, ctx.dist)
        safe = torch.zeros(n, dtype=torch.bool)
        safe[torch.tensor(decision["safe_idx"], dtype=torch.long)] = True
        self._safe, self._sims, self._dense, self._m = safe, sims, dense, decision["m"]
        rec.update(decision["log"])
        if scores.log_repeat is not None:
            rec["repeated_images"] = self._log_repeated  # pairs of this epoch's scoring flagged as copies
        if scores.log_kdist_given_image is not None:
            rec["density_spared"] = self._log_spared  # flagged as sparse, spared as sparse as their images' pairs
        if self._strikes is not None:  # pairs the density memory keeps out for good
            rec["density_out_for_good"] = int((self._strikes >= o.density_strikes).sum())
        rec.update({"safe_size": int(safe.sum()), "safe_fraction": round(float(safe.float().mean()), 6),
                    "evaluated_pairs": int(len(cand)), "full_evaluation": bool(full),
                    "similarity_seconds": round(t_sims, 4),
                    "split_seconds": round(time.perf_counter() - t0, 4)})
        return rec

    def _veto(self, n: int, cand: torch.Tensor, log_kd: torch.Tensor | None,
              log_rd: torch.Tensor | None = None, log_given: torch.Tensor | None = None,
              patterned: torch.Tensor | None = None) -> torch.Tensor:
        """Which pairs the density and repeated-image vetoes let through, after this epoch's
        scores of ``cand``.

        Pairs not re-scored keep their last verdict (they are outside the safe set anyway). With
        ``density_memory`` the vetoes from the second split on are counted per pair, and a pair
        with ``density_strikes`` of them stays out for good (the first split's verdict, made by a
        barely aligned model, is not counted, except for a pair the second split does not
        re-score: its first verdict is its last one). With ``density_memory_splits`` only that
        many splits after the first are counted; later verdicts hold for their epoch only. With
        ``log_given`` (``density_given: image``) a pair is flagged only when it is an outlier of
        both ``log_kd`` and ``log_given``. ``patterned`` (bool, every pair of the data): the
        pattern veto's verdicts, counted with the others."""
        dense = self._dense.clone() if self._dense is not None else torch.ones(n, dtype=torch.bool)
        verdict = torch.ones(len(cand), dtype=torch.bool)
        if log_kd is not None:
            inlier = dense_inliers(log_kd, self.opt.density_z)
            if log_given is not None:
                spared = ~inlier & dense_inliers(log_given, self.opt.density_z)
                self._log_spared = int(spared.sum())
                inlier |= spared
            verdict &= inlier
        if log_rd is not None:
            repeated = repeated_images(log_rd, self.opt.repeat_z)
            self._log_repeated = int(repeated.sum())
            verdict &= ~repeated
        struck = verdict  # what counts as a strike: with pattern_strikes the pattern flags too
        if patterned is not None:
            verdict = verdict & ~patterned[cand]
            if self.opt.pattern_strikes:
                struck = verdict
        window = self.opt.density_memory_splits
        counted = window is None or self._dense_rounds <= window
        if self.opt.density_memory and self._dense_rounds >= 1 and counted:
            if self._strikes is None:
                # the first counted split: a pair it does not re-score carries the first split's
                # veto as one strike (as the memory always did: its last verdict stands)
                self._strikes = (~dense).to(torch.uint8)
                self._strikes[cand] = 0
            strikes = self._strikes[cand].to(torch.int16) + (~struck).to(torch.int16)
            self._strikes[cand] = strikes.clamp(max=255).to(torch.uint8)
        dense[cand] = verdict
        if self.opt.density_memory and self._strikes is not None:  # out for good, re-scored or not
            dense &= self._strikes < self.opt.density_strikes
        self._dense_rounds += 1
        return dense

    def _reference(self, epoch: int) -> torch.Tensor | None:
        """The rows of a seeded sample of the data's captions (``rank_by: relative``), whose
        features ``shard_pair_scores`` takes from the split's own encode where it has them."""
        if self.opt.rank_by != "relative":
            return None
        g = torch.Generator().manual_seed(step_seed(self.ctx.seed, "safeclip-reference", epoch))
        return torch.randperm(len(self.ctx.data), generator=g)[: self.opt.reference_captions]

    def _decide(self, sims: torch.Tensor, dense: torch.Tensor | None = None,
                rescored: torch.Tensor | None = None, faint: torch.Tensor | None = None) -> dict[str, Any]:
        """Rank 0 only: the GMM split the first time, the grown top-m% afterwards.

        With ``safe_size`` ``outlier`` (or ``mixture``) m never exceeds a ceiling re-measured
        every epoch from the scores: the data, not a fixed cap, says how many pairs look clean,
        so long runs do not creep into the low-score tail. ``rescored`` (bool, ``update_ranks``
        rescored-first): the pairs this update scored again, which the top m% is taken from first.
        ``faint`` (bool, with ``tail_pattern_z``): the pairs whose pattern z-score exceeds it; m then
        grows past the ceiling, and only the tail pairs among them stay out."""
        log: dict[str, Any] = {}
        o = self.opt
        p_clean = tail_out = None
        if self._m is None or o.rank_by == "p_clean" or o.safe_size == "mixture":  # (re-)fit the mixture
            t0 = time.perf_counter()
            p_clean, info = fit_gmm(sims, seed=o.gmm_seed)
            log["gmm_seconds"] = round(time.perf_counter() - t0, 4)
            log.update(info.as_dict())
        scores = p_clean if o.rank_by == "p_clean" else sims
        if self._m is None:
            log["threshold_fraction"] = round(float((p_clean > o.threshold).float().mean()), 6)
            mask, m = self._sizer.first_split(p_clean, sims)
            log["first_split"] = True
        else:
            m = self._sizer.grow(self._m)
            mask = None
        if o.safe_size != "schedule":
            if o.safe_size == "mixture":
                estimate = info.weights[1] - o.mixture_margin
            else:
                estimate = inlier_fraction(scores, o.outlier_z)
            ceiling = max(o.min_initial_fraction, estimate)
            log["size_ceiling"] = round(ceiling, 6)
            if not o.safe_set_shrinks and self._m is not None:
                ceiling = max(ceiling, self._m)  # the set it has reached stays its floor
            if faint is not None:  # the tail is judged pair by pair below, not by a cap on m
                tail_out = outlier_tail(scores, o.outlier_z) & faint
                log["tail_kept_out"] = int(tail_out.sum())
            elif m > ceiling:
                m, mask = ceiling, None
        if mask is None:
            mask = top_fraction_mask(scores if rescored is None else rescored_first(scores, rescored), m)
        if o.update_entry == "consensus" and self._sims is not None and self._m is not None:
            # an update: only pairs the last split's scores also put in the top m% (``self._sims``
            # still holds those scores here)
            agree = top_fraction_mask(self._sims, m)
            log["consensus_dropped"] = int((mask & ~agree).sum())
            mask = mask & agree
        if tail_out is not None:
            mask = mask & ~tail_out
        if dense is not None:
            # the veto only removes pairs: m keeps growing on the ranking, the set is its intersection
            log["density_vetoed"] = int((mask & ~dense).sum())
            mask = mask & dense
        log["m"] = round(m, 6)
        return {"safe_idx": torch.nonzero(mask).flatten().tolist(), "m": m, "log": log}

    # ------------------------------------------------------------------ losses
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ph = self.phase(self.ctx.epoch)
        if ph == "clip_low":
            pixels, tokens = batch.pixels, batch.tokens
            if self._warm_views is not None:
                pixels = self._warm_views.images(pixels, batch.generator)
                tokens = self.ctx.tokenize(self._warm_views.texts(batch.captions, batch.rng))
            img, txt, scale = self.ctx.forward(pixels, tokens)
            loss, logs = small_loss_clip_loss(img, txt, scale, self.ctx.dist, self.opt.clip_warmup_keep)
            self._aligned.add(logs["clip_loss"])
            return loss, logs
        if ph == "unimodal":
            safe = torch.zeros(len(batch.indices), dtype=torch.bool, device=batch.pixels.device)
        else:
            if self._safe is None:
                raise RuntimeError("safeclip: mixed epoch without a split (on_epoch_start not called)")
            safe = self._safe[batch.indices.cpu()].to(batch.pixels.device)
        borrowing = self._borrows(ph == "mixed")  # asked before loss_terms pushes to the safe pool
        terms = self.loss_terms(batch, safe, borrow=ph == "mixed")
        w_clip = w_uni = 1.0
        if self.opt.loss_weighting == "pairs" and ph == "mixed":
            w_clip = float(all_gather_nograd(safe.float(), self.ctx.dist).mean())
            w_uni = 1.0 - w_clip
            if borrowing:  # every pair is in the CLIP term
                w_clip = 1.0
        loss = w_clip * terms["clip"] + w_uni * (terms["unimodal_image"] + terms["unimodal_text"])
        if "pattern_unlearn" in terms:
            loss = loss + self.opt.pattern_unlearn * terms["pattern_unlearn"]
        logs = {f"{k}_loss": float(v.detach()) for k, v in terms.items()}
        logs["batch_safe_fraction"] = float(safe.float().mean())
        return loss, logs

    def _safe_views(self) -> tuple[str, str]:
        """(image, text) views of the safe pairs this epoch: the options', or none once the first
        ``safe_augment_epochs`` mixed epochs are over."""
        o = self.opt
        if o.safe_augment_epochs is not None and self.phase(self.ctx.epoch) == "mixed":
            r, c, _ = self._require_plan()
            if self.ctx.epoch - r - c >= o.safe_augment_epochs:
                return "none", "none"
        return o.safe_image_augment, o.safe_text_augment

    def _borrows(self, mixed: bool) -> bool:
        """Whether a mixed step's CLIP term holds the risky pairs too, with borrowed captions
        (``risky_clip: neighbours``, once the safe pool holds ``risky_clip_k`` pairs)."""
        pool = self._safe_pool
        return mixed and pool is not None and len(pool) >= self.opt.risky_clip_k

    def loss_terms(self, batch: Batch, safe: torch.Tensor, borrow: bool = False) -> dict[str, torch.Tensor]:
        """The three terms of Eq. 4 from ONE forward with gradient.

        View 1 is the pair CLIP trains on for a safe pair and the first unimodal view of a risky
        one; second views exist only for risky pairs. With ``second_view_grad`` (the default, as
        NNCLR) both views are in the one forward and the loss is symmetrised; without it the
        second views are encoded without gradient, as the target side of the nearest-neighbour
        loss, so a risky pair costs one forward more than a CLIP pair instead of a forward and a
        backward. Second-view features are scattered back into batch-sized tensors, so shapes
        match across ranks and masks pick the valid rows.
        """
        if self.opt.risky_loss == "none":
            return self._clip_terms(batch, safe)
        ctx = self.ctx
        b = len(batch.indices)
        risky = ~safe
        ridx = torch.nonzero(risky).flatten()
        pixels, caps = batch.pixels, batch.captions
        views, o = self._views, self.opt
        image_aug, text_aug = self._safe_views()
        # every row draws a view 1 (a safe row then takes its own image or caption back as the
        # safe_* options say): the draws do not depend on the split, so a run is the same
        # sequence of random numbers whatever the safe set. Only the rows that use a view are
        # transformed (``rows``: the same views, the same draws)
        if image_aug == "simclr":
            v1 = views.images(pixels, batch.generator)
        else:
            v1 = pixels.clone()
            v1[ridx] = views.images(pixels, batch.generator, rows=ridx.cpu())
            if image_aug == "crop-flip":
                sidx = torch.nonzero(safe).flatten()
                v1[sidx] = views.images(pixels, batch.generator, geometric_only=True, rows=sidx.cpu())
        one_view = o.risky_loss == "one-view"
        v2 = None if one_view else views.images(pixels[ridx], batch.generator)
        t1 = views.texts(caps, batch.rng)
        if text_aug == "none":
            t1 = [c if s else a for c, a, s in zip(caps, t1, safe.tolist())]
        t2 = None if one_view else views.texts([caps[i] for i in ridx.tolist()], batch.rng)
        if one_view:
            img1, txt1, scale = ctx.forward(v1, ctx.tokenize(t1))
            img2r = txt2r = None
        elif o.second_view_grad:
            img, txt, scale = ctx.forward(torch.cat([v1, v2]), ctx.tokenize(t1 + t2))
            img1, txt1, img2r, txt2r = img[:b], txt[:b], img[b:], txt[b:]
        else:
            img2r, txt2r = ctx.encode_views(v2, ctx.tokenize(t2)) if len(ridx) else (None, None)
            img1, txt1, scale = ctx.forward(v1, ctx.tokenize(t1))
        if img2r is None:
            img2, txt2 = img1.detach(), txt1.detach()  # no risky row: the masked losses ignore them
        else:
            img2 = torch.zeros_like(img1).index_copy(0, ridx, img2r.to(img1.dtype))
            txt2 = torch.zeros_like(txt1).index_copy(0, ridx, txt2r.to(txt1.dtype))
        pool = self._safe_pool
        if self._borrows(borrow):
            # every rank sees the same pool, so every rank takes this branch together
            target = torch.zeros_like(txt1)
            if len(ridx):
                with torch.no_grad():
                    probe, _ = ctx.encode_views(pixels[ridx])
                    near = pool.payload[pool.nearest_k_index(probe, o.risky_clip_k)].mean(dim=1)
                target = target.index_copy(0, ridx, torch.nn.functional.normalize(near, dim=-1).to(txt1.dtype))
            clip = clip_loss(img1, torch.where(risky[:, None], target, txt1), scale, ctx.dist)
        else:
            clip = clip_loss(img1, txt1, scale, ctx.dist, mask=safe, negatives=risky if o.risky_negatives else None)
        g_img = all_gather_nograd(img1.detach().contiguous(), ctx.dist)
        g_txt = all_gather_nograd(txt1.detach().contiguous(), ctx.dist)
        # which rows of the global batch are safe: for the safe pool and the kept step features only
        wants_safe = borrow and (pool is not None or self._step_feats is not None)
        g_safe = all_gather_nograd(safe.to(torch.uint8), ctx.dist).bool() if wants_safe else None
        if pool is not None and borrow and bool(g_safe.any()):
            pool.push(g_img[g_safe], g_txt[g_safe])
        if one_view:
            uni_img = nn_self_loss(img1, self._img_pool, risky, o.temperature, ctx.dist)
            uni_txt = nn_self_loss(txt1, self._txt_pool, risky, o.temperature, ctx.dist)
        else:
            nn_loss = nn_contrastive_loss if o.second_view_grad else nn_target_loss
            uni_img = nn_loss(img1, img2, self._img_pool, risky, o.temperature, ctx.dist)
            uni_txt = nn_loss(txt1, txt2, self._txt_pool, risky, o.temperature, ctx.dist)
        # the pools hold the first views of the whole (global) batch, oldest displaced first
        self._img_pool.push(g_img)
        self._txt_pool.push(g_txt)
        if borrow and self._step_feats is not None:
            self._keep_step_features(batch, g_safe, g_img, g_txt)
        return self._with_unlearning({"clip": clip, "unimodal_image": uni_img, "unimodal_text": uni_txt},
                                     batch, img1, txt1, scale)

    def _with_unlearning(self, terms: dict[str, torch.Tensor], batch: Batch, img: torch.Tensor,
                         txt: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pattern_unlearn``: add the term that unlearns this batch's pattern-flagged pairs (a
        mixed step's flags; none in other phases)."""
        if self._unlearnt is None:
            return terms
        rows = self._unlearnt[batch.indices.cpu()].to(img.device)
        txt = txt if self.opt.pattern_unlearn_text else txt.detach()
        terms["pattern_unlearn"] = own_caption_unlearning(img, txt, scale, rows)
        return terms

    def _keep_step_features(self, batch: Batch, g_safe: torch.Tensor, g_img: torch.Tensor,
                            g_txt: torch.Tensor) -> None:
        """``update_features: steps``: remember the safe rows' features of this mixed step (the
        global batch, so every rank holds them all) for the next split update."""
        rows = all_gather_nograd(batch.indices.to(g_img.device), self.ctx.dist)[g_safe].cpu()
        if len(rows):
            feats = torch.cat([g_img[g_safe], g_txt[g_safe]], dim=1).cpu()
            self._step_feats[rows] = feats.to(self._step_feats.dtype)
            self._step_fresh[rows] = True

    def _clip_terms(self, batch: Batch, safe: torch.Tensor) -> dict[str, torch.Tensor]:
        """``risky_loss: none``: one forward of the batch (the safe pairs' views as the safe_*
        options say), the CLIP term over the safe rows, no unimodal terms and no second views.
        Every row is encoded, so the shapes match across ranks; the risky rows' features serve
        only as ``risky_negatives``."""
        ctx, o, views = self.ctx, self.opt, self._views
        image_aug, text_aug = self._safe_views()
        pixels, caps = batch.pixels, batch.captions
        if image_aug != "none":
            pixels = views.images(pixels, batch.generator, geometric_only=image_aug == "crop-flip")
        if text_aug != "none":
            caps = views.texts(caps, batch.rng)
        img, txt, scale = ctx.forward(pixels, ctx.tokenize(caps))
        clip = clip_loss(img, txt, scale, ctx.dist, mask=safe, negatives=~safe if o.risky_negatives else None)
        if self._step_feats is not None and self.phase(ctx.epoch) == "mixed":
            self._keep_step_features(batch, all_gather_nograd(safe.to(torch.uint8), ctx.dist).bool(),
                                     all_gather_nograd(img.detach().contiguous(), ctx.dist),
                                     all_gather_nograd(txt.detach().contiguous(), ctx.dist))
        zero = clip.new_zeros(())
        return self._with_unlearning({"clip": clip, "unimodal_image": zero, "unimodal_text": zero},
                                     batch, img, txt, scale)

    # ------------------------------------------------------------------ diagnostics and state
    def pair_scores(self) -> torch.Tensor | None:
        return self._sims if self._safe is not None else None

    def selected(self) -> torch.Tensor | None:
        return self._safe

    def flagged(self) -> torch.Tensor | None:
        return self._patterned

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        out.update(self._img_pool.state_tensors("img_pool"))
        out.update(self._txt_pool.state_tensors("txt_pool"))
        if self._safe_pool is not None:
            out.update(self._safe_pool.state_tensors("safe_pool"))
        if self._sims is not None:
            out["sims"] = self._sims.contiguous()
        if self._safe is not None:
            out["safe"] = self._safe.to(torch.uint8).contiguous()
        if self._dense is not None:
            out["dense"] = self._dense.to(torch.uint8).contiguous()
        if self._strikes is not None:
            out["strikes"] = self._strikes.contiguous()
        if self._patterned is not None:
            out["patterned"] = self._patterned.to(torch.uint8).contiguous()
        if self._full_patterned is not None and self.opt.pattern_partial == "full":
            out["full_patterned"] = self._full_patterned.to(torch.uint8).contiguous()
        if self._unlearnt is not None and self.opt.pattern_unlearn_z is not None:  # else: the veto's flags
            out["unlearnt"] = self._unlearnt.to(torch.uint8).contiguous()
        if self._step_feats is not None:
            out["step_features"] = self._step_feats.contiguous()
            out["step_fresh"] = self._step_fresh.to(torch.uint8).contiguous()
        return out

    def state_json(self) -> dict[str, Any]:
        return {"m": self._m, "dense_rounds": self._dense_rounds}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._img_pool.load_state(tensors, "img_pool")
        self._txt_pool.load_state(tensors, "txt_pool")
        if self._safe_pool is not None:
            self._safe_pool.load_state(tensors, "safe_pool")
        self._sims = tensors["sims"].clone() if "sims" in tensors else None
        self._safe = tensors["safe"].bool().clone() if "safe" in tensors else None
        self._dense = tensors["dense"].bool().clone() if "dense" in tensors else None
        self._patterned = tensors["patterned"].bool().clone() if "patterned" in tensors else None
        self._full_patterned = tensors["full_patterned"].bool().clone() if "full_patterned" in tensors else None
        self._unlearnt = tensors["unlearnt"].bool().clone() if "unlearnt" in tensors else None
        if self.opt.pattern_unlearn is not None and self.opt.pattern_unlearn_z is None:
            self._unlearnt = self._patterned  # without its own cut the term unlearns every vetoed pair
        self._m = meta.get("m")
        self._dense_rounds = int(meta.get("dense_rounds", 0))
        self._strikes = tensors["strikes"].to(torch.uint8).clone() if "strikes" in tensors else None
        if self._step_feats is not None and "step_features" in tensors:
            saved = tensors["step_features"]
            if tuple(saved.shape) != tuple(self._step_feats.shape):
                raise ValueError(f"saved step_features are {tuple(saved.shape)}, expected "
                                 f"{tuple(self._step_feats.shape)}")
            self._step_feats = saved.to(torch.float16).clone()
            self._step_fresh = tensors["step_fresh"].bool().clone()
        if self._strikes is None and self._dense is not None and self._dense_rounds >= 2:
            # a state written before vetoes were counted: every vetoed pair had its one strike
            self._strikes = (~self._dense).to(torch.uint8)
