"""The pattern veto of a safe set: pairs whose image carries the pattern their caption group's
riskiest pairs share stay out of the CLIP loss.

Why: a backdoor's poisons share one additive image pattern (a patch, a blended image, a
sinusoid) and one target caption. The density veto reads the model's embedding; once the model
has half learnt a trigger, some poisons sit in their target's dense region and pass it
(docs/safeclip-selection.md, the twenty-third and thirty-fifth rounds: a looser density veto lets
learnt Blended, BadNet and SIG poisons in). This veto reads pixels, which training cannot move: it
is the scan's ``pattern`` detector (docs/scan.md) with the split's own risk ranking as its
suspects, so it needs no second model.

Per split: the captions are grouped by k-means on this epoch's text embeddings (``clusters``
groups, or fewer where ``group_pairs`` asks each to hold that many pairs on average: a group's
pattern is a mean of its suspects, too noisy to see a faint trigger from a handful of them); in each group the
``share`` of pairs the split ranks riskiest estimate the group's pattern (their mean high-passed
image minus the group's, whitened by the shrunk inverse covariance of every training image's);
a pair is vetoed when its own image's projection on it is more than ``z`` robust standard
deviations above the group's other pairs'. Groups with no shared pattern rarely pass ``z``.

Cost: every image is decoded and high-passed once, and kept (at most 32 x 32 floats each); each
split encodes every caption (the text tower only; a caller that already holds this epoch's caption
embeddings, or some of them, passes them instead, rows of NaN for the rest) and fits the k-means, on
the main rank.
"""

from __future__ import annotations

import numpy as np
import torch

from clipguard.data.signatures import pixel_residuals
from clipguard.detection.detectors.pattern import PatternOptions, pattern_scores, shrunk_precision
from clipguard.detection.detectors.spectral import caption_groups
from clipguard.evaluation.features import encode_tokens
from clipguard.training.context import TrainContext
from clipguard.training.distributed import broadcast_object


class PatternVeto:
    """Holds the training images' high-passed pixels and their whitening (computed once: the
    pixels never change) and judges every pair at each split."""

    def __init__(self, z: float, share: float, clusters: int, seed: int = 0, group_pairs: int | None = None) -> None:
        self.z, self.share, self.clusters, self.seed, self.group_pairs = z, share, clusters, seed, group_pairs
        self._residuals: torch.Tensor | None = None
        self._precision: torch.Tensor | None = None

    def _pixels(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        if self._residuals is None:
            self._residuals = pixel_residuals(images)
            self._precision = shrunk_precision(self._residuals, seed=self.seed)
        return self._residuals, self._precision

    def scores(self, ctx: TrainContext, suspicion: torch.Tensor, text: torch.Tensor | None = None) -> np.ndarray:
        """Every pair's pattern z-score (higher: its image carries its group's suspects' pattern).
        ``suspicion``: one value per pair of the data, higher for riskier pairs. ``text``: the caption
        embeddings to group the pairs by, when the caller has them (rows of NaN are encoded here);
        None: every caption is encoded."""
        residuals, precision = self._pixels(ctx.data.images)
        text = caption_embeddings(ctx, text).numpy()
        # the scan detector's defaults: the k-means sample's size, the smallest group judged
        groups = caption_groups(text, self.groups_for(len(text)), self.seed, PatternOptions.max_points)
        return pattern_scores(residuals, groups, suspicion.double().numpy(), self.share, PatternOptions.min_group,
                              precision)

    def groups_for(self, pairs: int) -> int:
        """How many caption groups ``pairs`` pairs are split into: ``clusters``, or fewer so that each
        holds ``group_pairs`` pairs on average (at least one group)."""
        if self.group_pairs is None:
            return self.clusters
        return max(1, min(self.clusters, pairs // self.group_pairs))

    @torch.no_grad()
    def vetoed(self, ctx: TrainContext, suspicion: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """bool (N,): the pairs whose pattern z-score exceeds ``z``. Computed on the main rank
        and sent to the others, so every rank's safe set is the same."""
        return self.flags(ctx, suspicion, (self.z,), text)[0]

    @torch.no_grad()
    def flags(self, ctx: TrainContext, suspicion: torch.Tensor, cuts: tuple[float, ...],
              text: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One bool (N,) per cut: the pairs whose pattern z-score exceeds it (one scoring for all)."""
        out = None
        if ctx.dist.is_main:
            z = np.nan_to_num(self.scores(ctx, suspicion, text), nan=0.0)
            out = [np.nonzero(z > cut)[0].tolist() for cut in cuts]
        out = broadcast_object(out, ctx.dist)
        masks = []
        for rows in out:
            mask = torch.zeros(len(suspicion), dtype=torch.bool)
            mask[torch.tensor(rows, dtype=torch.long)] = True
            masks.append(mask)
        return masks


@torch.no_grad()
def caption_embeddings(ctx: TrainContext, text: torch.Tensor | None) -> torch.Tensor:
    """Every pair's caption embedding: ``text`` where given, its rows of NaN (pairs the caller did
    not reach) and all of them when ``text`` is None encoded by the current text tower."""
    if text is None:
        return encode_tokens(ctx.raw_model, ctx.tokens, ctx.device)
    out = text.clone()
    missing = torch.nonzero(out.isnan().any(dim=1)).flatten()
    if len(missing):
        out[missing] = encode_tokens(ctx.raw_model, ctx.tokens[missing], ctx.device)
    return out
