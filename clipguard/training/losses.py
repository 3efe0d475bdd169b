"""Contrastive losses as small composable functions (in the spirit of open_clip's loss.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard.training.distributed import DistInfo, all_gather_nograd, gather_with_local_grad

MAX_LOGIT_SCALE = 4.605170185988092  # ln(100)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def _replicated(x: float | torch.Tensor, dist: DistInfo) -> float | torch.Tensor:
    """A parameter every rank holds whole (the logit scale, a learned temperature): the loss is
    the global batch's on every rank, so its gradient is already complete and must not be
    multiplied by the world size like the features' local slices."""
    if dist.world_size > 1 and isinstance(x, torch.Tensor) and x.requires_grad:
        return _ScaleGrad.apply(x, 1.0 / dist.world_size)
    return x


def global_loss(loss: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The global batch's loss as its value, with world_size times its gradient: each rank's
    features get gradient only through their own slice, so DDP's averaging over ranks then gives
    exactly the gradient of one process holding the whole batch."""
    w = dist.world_size
    return loss if w == 1 else loss * w - loss.detach() * (w - 1)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              dist: DistInfo | None = None, mask: torch.Tensor | None = None,
              negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; ``mask`` keeps a subset of rows (e.g. safe pairs).

    ``negatives`` (with ``mask``): rows outside the mask whose images are extra negatives of the
    kept captions, in the caption-to-image direction only (they have no caption to match). A
    caption is then pushed away from the images of pairs a defence does not trust, as a poisoned
    image the model has already tied to that caption.

    Features are L2-normalised open_clip outputs. Under DDP the features of all ranks are
    gathered (gradient for the local slice only) and the loss is scaled by the world size, so
    the averaged gradient equals that of one process holding the whole batch. The value is the
    global batch's loss, and the logit scale (held whole by every rank) gets its own gradient.
    """
    dist = dist or DistInfo()
    logit_scale = _replicated(logit_scale, dist)
    img = gather_with_local_grad(image_features, dist)
    txt = gather_with_local_grad(text_features, dist)
    extra = None
    if mask is not None:  # (no mask: every row, with no host sync and no copy)
        keep = all_gather_nograd(mask.to(torch.uint8), dist).bool()
        if int(keep.sum()) == 0:
            return image_features.sum() * 0.0 + text_features.sum() * 0.0
        if negatives is not None:
            extra_rows = all_gather_nograd(negatives.to(torch.uint8), dist).bool() & ~keep
            extra = img[extra_rows] if bool(extra_rows.any()) else None
        img, txt = img[keep], txt[keep]
    logits = logit_scale * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    text_logits = logits.t() if extra is None else logit_scale * txt @ torch.cat([img, extra]).t()
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(text_logits, labels))
    return global_loss(loss, dist)


def own_caption_unlearning(image_features: torch.Tensor, text_features: torch.Tensor,
                           logit_scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Push each image of ``rows`` (bool, local batch) below the batch's mean caption score for
    its own caption: softplus(s_ii - mean_j s_ij), averaged over those rows (0 when none).

    Why: a poisoned image whose trigger the model already ties to its target caption keeps that
    tie even when it never trains with the CLIP loss again; this term unlearns it (the images an
    image-side detector flags, as anti-backdoor learning unlearns its isolated samples). It is
    bounded, as gradient ascent on the CLIP loss is not: once the own caption scores below the
    batch's average caption, the gradient fades. The logit scale is held fixed here, so the term
    cannot move the temperature. Local rows only: each rank unlearns its own flagged images.
    """
    if not bool(rows.any()):
        return image_features.sum() * 0.0 + text_features.sum() * 0.0
    img = image_features[rows]
    logits = logit_scale.detach() * img @ text_features.t()
    own = logits.gather(1, torch.nonzero(rows).flatten()[:, None]).squeeze(1)
    return F.softplus(own - logits.mean(dim=1)).mean()


@torch.no_grad()
def lowest_loss_rows(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     keep: float, dist: DistInfo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of this rank's batch whose own CLIP loss (the mean of its image-to-caption and
    caption-to-image terms over the global batch) is among the ``keep`` share lowest, and the
    global batch's mean of that per-pair loss.

    Why: a pair whose caption does not fit its image keeps a high loss while the clean pairs
    align (the small-loss selection of learning with noisy labels), so leaving the highest-loss
    share out of a step keeps such pairs from being learnt before a defence's first split. Ties at
    the cut are all kept."""
    dist = dist or DistInfo()
    img = all_gather_nograd(image_features.detach().float().contiguous(), dist)
    txt = all_gather_nograd(text_features.detach().float().contiguous(), dist)
    logits = float(logit_scale) * img @ txt.t()
    labels = torch.arange(len(img), device=img.device)
    per = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                 + F.cross_entropy(logits.t(), labels, reduction="none"))
    n_keep = min(len(per), max(1, round(keep * len(per))))
    cut = per.kthvalue(n_keep).values
    b = len(image_features)
    local = per[dist.rank * b:(dist.rank + 1) * b] if dist.enabled else per
    return local <= cut, per.mean()


def small_loss_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                         dist: DistInfo | None, keep: float | None, mask: torch.Tensor | None = None,
                         negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``clip_loss`` over ``mask``'s rows (``negatives`` as there), narrowed with ``keep`` to the
    rows among the ``keep`` share with the lowest own loss (``lowest_loss_rows``), and its logs:
    ``clip_loss`` is the loss, or with ``keep`` the whole batch's mean per-pair loss (what a
    comparison with chance must read), beside ``kept_clip_loss``, the loss trained."""
    if keep is None:
        loss = clip_loss(image_features, text_features, logit_scale, dist, mask=mask, negatives=negatives)
        return loss, {"clip_loss": float(loss.detach())}
    low, whole = lowest_loss_rows(image_features, text_features, logit_scale, keep, dist)
    rows = low if mask is None else mask & low
    loss = clip_loss(image_features, text_features, logit_scale, dist, mask=rows, negatives=negatives)
    return loss, {"clip_loss": float(whole), "kept_clip_loss": float(loss.detach())}


def grouped_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                      groups: torch.Tensor, dist: DistInfo | None = None) -> torch.Tensor:
    """CLIP's loss when several rows may share one caption (equal ``groups`` ids: the same caption).

    Plain InfoNCE makes a shared caption a negative of its own images: an image paired with
    caption c also sees c, as another row's caption, among its negatives, and c's rows pull and
    push the same image. Here the captions are the distinct groups (the mean of a group's text
    rows): each image is classified among the distinct captions, and each caption spreads its
    target evenly over its images. With every id distinct this is ``clip_loss`` (it is called)."""
    dist = dist or DistInfo()
    g = all_gather_nograd(groups.to(image_features.device).long().contiguous(), dist)
    uniq, inverse = torch.unique(g, return_inverse=True)
    if len(uniq) == len(g):
        return clip_loss(image_features, text_features, logit_scale, dist)
    logit_scale = _replicated(logit_scale, dist)
    img = gather_with_local_grad(image_features, dist)
    txt = gather_with_local_grad(text_features, dist)
    members = F.one_hot(inverse, len(uniq)).t().to(txt.dtype)  # (U, N)
    members = members / members.sum(dim=1, keepdim=True)
    captions = members @ txt  # each distinct caption: the mean of its rows (identical rows: itself)
    logits = logit_scale * img @ captions.t()  # (N, U)
    loss = 0.5 * (F.cross_entropy(logits, inverse) + F.cross_entropy(logits.t(), members))
    return global_loss(loss, dist)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float | torch.Tensor,
             dist: DistInfo | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One-directional InfoNCE: row i of ``queries`` should match row i of ``keys``.

    The in-modal losses (an image and its view, a caption and its EDA view) and SafeCLIP's
    nearest-neighbour loss. Rows are gathered across ranks first (fixed shapes, gradient on the
    local slice), then ``mask`` keeps a subset, so every rank may hold a different number of
    valid rows; no valid row anywhere gives an exact zero that still touches both inputs (DDP
    needs the graph).
    """
    dist = dist or DistInfo()
    temperature = _replicated(temperature, dist)
    q = gather_with_local_grad(queries, dist)
    k = gather_with_local_grad(keys, dist)
    if mask is not None:
        keep = all_gather_nograd(mask.to(torch.uint8), dist).bool()
        if int(keep.sum()) == 0:
            return queries.sum() * 0.0 + keys.sum() * 0.0
        q, k = q[keep], k[keep]
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return global_loss(F.cross_entropy(logits, labels), dist)
