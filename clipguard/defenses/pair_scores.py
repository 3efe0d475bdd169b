"""Per-pair scores for SafeCLIP's split, computed by shards across ranks.

Two signals, both from clean (non-augmented) pairs:

* the pair's similarity, optionally *relative*: minus the mean of its image's ``top_k``
  similarities to a sample of captions. A poisoned pair's image prefers other captions to its
  own; a pair of a class the model still confuses keeps its caption near its class's captions.
* the pair's *joint density*: the log distance from its joint embedding (image and caption
  features side by side) to its ``k``-th nearest neighbour among a sample of the pairs. A clean
  pair has many pairs like it, with a similar image AND a similar caption; a poisoned pair joins
  an image of one kind to a caption of another, a combination only the other poisons share.
  This stays informative after the model has started to learn the poisons, when the similarity
  of a learned poison already looks clean (docs/safeclip-selection.md, first round).
* the pair's *image repetition*: the log distance from its image embedding (or its coarse pixel
  signature, ``clipguard.data.signatures``) to its ``k``-th nearest image among the same sample.
  Targeted poisoning repeats one target image under many captions; near-identical copies sit far
  closer to each other than any two clean images do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from clipguard.data.signatures import pixel_signatures
from clipguard.detection.knn import knn
from clipguard.training.context import TrainContext
from clipguard.training.distributed import all_gather_nograd, all_reduce_sum


def embed_dim(model: torch.nn.Module) -> int:
    """Width of the joint embedding of an open_clip CLIP."""
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if dim is None:
        dim = model.text_projection.shape[1]
    return int(dim)


def _gather_in_order(values: torch.Tensor, n: int, ctx: TrainContext) -> torch.Tensor:
    """Put each rank's shard (rows ``rank::world`` of ``n``) back in order, on every rank."""
    dist = ctx.dist
    world = dist.world_size
    if world == 1:
        return values.float().cpu()
    per = math.ceil(n / world)
    padded = torch.full((per, values.shape[1]), float("nan"), device=ctx.device)
    padded[: len(values)] = values.to(ctx.device)
    allp = all_gather_nograd(padded, dist).cpu().view(world, per, values.shape[1])
    out = torch.empty(n, values.shape[1])
    for r in range(world):
        out[r::world] = allp[r, : len(range(r, n, world))]
    return out


def _against_nearest(part: torch.Tensor, ref_part: torch.Tensor, mine_self: torch.Tensor,
                     log_kd: torch.Tensor, ref_log: torch.Tensor, near_k: int) -> torch.Tensor:
    """``log_kd`` minus the median of ``ref_log`` over the ``near_k`` sampled pairs nearest each
    query in one part of the joint features (its caption's, or its image's), the query itself
    excluded."""
    dc, ic = knn(part, ref_part, near_k + 1, metric="cosine")
    dc = dc.masked_fill(ic == mine_self[:, None], float("inf"))
    near = ic.gather(1, torch.sort(dc, dim=1).indices[:, :near_k])
    return log_kd - ref_log[near].median(dim=1).values


def _log_kdist(ctx: TrainContext, feats: torch.Tensor, n: int, k: int, reference: int,
               seed: int, metric: str = "l2", relative_to: str = "all", caption_from: int = 0,
               caption_k: int = 64, given_image_k: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log distance of this rank's features (joint, or image only) to their k-th neighbour among
    a seeded sample of ``reference`` of the ``n`` scored pairs (the pair itself excluded when
    sampled), and, with ``given_image_k`` > 0, the same minus its median over the
    ``given_image_k`` sampled pairs whose images are nearest the pair's own (else None).

    ``relative_to``: ``all``, the log k-distance as it is (compared with every pair's by the
    caller); ``neighbours``, minus the mean of the same quantity for those k neighbours (each
    sampled pair against the rest of the sample), the log of a local density ratio as in SLOF;
    ``captions``, minus the median of that quantity over the ``caption_k`` sampled pairs whose
    captions are nearest the pair's own (the features from column ``caption_from`` on are the
    caption's). With either of the last two a class of diverse images, sparse everywhere, is not
    read as a class of outliers; ``captions`` measures a poison against the clean pairs of the
    caption it carries, not against the other poisons that are its joint neighbours. The second
    output asks the same of the image: is the pair sparser than pairs with images like its own
    (a caption that does not belong to its image), or only as sparse (a rare image)?"""
    dist = ctx.dist
    world, rank = dist.world_size, dist.rank
    g = torch.Generator().manual_seed(seed)
    ref_pos = torch.sort(torch.randperm(n, generator=g)[: min(reference, n)]).values
    # every rank fills the sampled rows it encoded; a sum across ranks completes the sample
    ref = torch.zeros(len(ref_pos), feats.shape[1], device=feats.device)
    own = (ref_pos % world) == rank
    ref[own] = feats[ref_pos[own] // world]
    ref = all_reduce_sum(ref, dist)
    kk = min(k, len(ref_pos) - 1)
    if len(feats) == 0 or kk < 1:
        return torch.zeros(len(feats)), (torch.zeros(len(feats)) if given_image_k > 0 else None)
    d, ix = knn(feats, ref, kk + 1, metric=metric)
    # the reference row that is this query itself (-1 when the query was not sampled)
    self_ref = torch.full((n,), -1, dtype=torch.long)
    self_ref[ref_pos] = torch.arange(len(ref_pos))
    mine_self = self_ref[torch.arange(rank, n, world)].to(ix.device)
    d = d.masked_fill(ix == mine_self[:, None], float("inf"))
    order = torch.sort(d, dim=1)
    log_kd = order.values[:, kk - 1].clamp_min(1e-12).log()
    if relative_to == "all" and given_image_k <= 0:
        return log_kd.cpu(), None
    dr, ir = knn(ref, ref, kk + 1, metric=metric)
    dr = dr.masked_fill(ir == torch.arange(len(ref), device=ir.device)[:, None], float("inf"))
    ref_log = torch.sort(dr, dim=1).values[:, kk - 1].clamp_min(1e-12).log().to(log_kd.device)
    given = None
    if given_image_k > 0:
        given = _against_nearest(feats[:, :caption_from], ref[:, :caption_from], mine_self, log_kd, ref_log,
                                 min(given_image_k, len(ref_pos) - 1)).cpu()
    if relative_to == "all":
        return log_kd.cpu(), given
    if relative_to == "neighbours":
        neighbours = ix.gather(1, order.indices[:, :kk])  # the pair itself sorted last (inf)
        return (log_kd - ref_log[neighbours].mean(dim=1)).cpu(), given
    return _against_nearest(feats[:, caption_from:], ref[:, caption_from:], mine_self, log_kd, ref_log,
                            min(caption_k, len(ref_pos) - 1)).cpu(), given


class PairScores(NamedTuple):
    """What ``shard_pair_scores`` measures of each scored pair (None: not asked for)."""

    score: torch.Tensor                           # similarity, or relative similarity
    log_kdist: torch.Tensor | None                # joint density, as ``density_relative_to`` says
    log_repeat: torch.Tensor | None               # image repetition
    log_kdist_given_image: torch.Tensor | None    # joint density against pairs with like images
    features: torch.Tensor | None = None          # (pairs, image dim + text dim), with a ``cache``
    text: torch.Tensor | None = None              # (pairs, text dim), with ``keep_text``


def _encode_or_reuse(ctx: TrainContext, mine: torch.Tensor, cache: torch.Tensor | None,
                     known: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of the pairs ``mine``: taken from ``cache`` where ``known`` says
    so, encoded (clean pairs) for the rest."""
    if cache is None or known is None:
        return ctx.encode_dataset(indices=mine)
    dim = cache.shape[1] // 2
    feats = cache[mine].float()
    todo = ~known[mine]
    if bool(todo.any()):
        img, txt = ctx.encode_dataset(indices=mine[todo])
        feats[todo] = torch.cat([img.float().cpu(), txt.float().cpu()], dim=1)
    feats = feats.to(ctx.device)
    return feats[:, :dim], feats[:, dim:]


def _reference_features(ctx: TrainContext, rows: torch.Tensor, mine: torch.Tensor,
                        txt: torch.Tensor | None) -> torch.Tensor:
    """The caption features of the data's ``rows``: taken from ``txt`` (this call's fresh features
    of ``mine``) where it holds every one of them, encoded otherwise. A row's features do not
    depend on the other rows of its batch, so both give the same bits on the CPU; a split that
    scores every pair on one process encodes no caption twice."""
    from clipguard.evaluation.features import encode_tokens

    if txt is not None and len(mine):
        where = torch.full((len(ctx.data),), -1, dtype=torch.long)
        where[mine] = torch.arange(len(mine))
        pos = where[rows]
        if bool((pos >= 0).all()):
            return txt[pos.to(txt.device)]
    return encode_tokens(ctx.raw_model, ctx.tokens[rows.to(ctx.tokens.device)], ctx.device)


@torch.no_grad()
def shard_pair_scores(ctx: TrainContext, indices: torch.Tensor, reference: torch.Tensor | None = None,
                      top_k: int = 10, density_k: int = 0, density_reference: int = 16384,
                      seed: int = 0, repeat_k: int = 0, repeat_grid: int = 0, density_relative_to: str = "all",
                      density_caption_k: int = 64, density_given_image_k: int = 0,
                      cache: torch.Tensor | None = None, known: torch.Tensor | None = None,
                      keep_text: bool = False) -> PairScores:
    """The ``PairScores`` of each pair in ``indices``, the same on every rank.

    Each rank encodes ``indices[rank::world]``. ``reference``: text features of a sample of
    captions, for the relative score, or (an integer tensor) the rows of the data whose captions
    are that sample. ``density_k`` > 0 adds the joint density, ``repeat_k`` > 0
    the image repetition (both against one seeded sample of ``density_reference`` pairs), in the
    image embedding or, with ``repeat_grid`` > 0, in coarse pixel signatures of that grid.
    ``density_relative_to``: the joint density as it is (``all``), relative to the pair's
    neighbours' or to the pairs' of its nearest captions (``neighbours``, ``captions``: see
    ``_log_kdist``); ``density_given_image_k`` > 0 adds it relative to the pairs' of that many
    nearest images.

    ``cache``: features of every pair of the data (image then text, as ``features`` returns
    them), the same on every rank; the pairs ``known`` (a bool per pair of the data) are taken
    from it instead of being encoded, and ``features`` then holds the scored pairs' features.
    ``keep_text``: ``text`` holds the scored pairs' caption features as scored, so a caller that
    needs them too (the pattern veto's caption groups) does not encode them again."""
    world, rank = ctx.dist.world_size, ctx.dist.rank
    mine = indices[rank::world]
    if len(mine):
        img, txt = _encode_or_reuse(ctx, mine, cache, known)
    else:
        img = txt = torch.empty(0, embed_dim(ctx.raw_model))
    if reference is not None and not reference.is_floating_point():  # rows of the data: their captions
        reference = _reference_features(ctx, reference, mine, txt if cache is None else None)
    sims = (img * txt).sum(dim=1)
    if reference is not None and len(mine):
        reference = reference.to(img.device)
        k = min(top_k, reference.shape[0])
        best = torch.cat([(img[i:i + 4096] @ reference.t()).topk(k, dim=1).values.mean(1)
                          for i in range(0, len(img), 4096)])
        sims = sims - best
    cols = {"score": sims.float().cpu()}  # one column per measure asked for, gathered together
    if density_k > 0:
        joint = torch.nn.functional.normalize(torch.cat([img, txt], dim=1), dim=1).to(ctx.device)
        cols["log_kdist"], given = _log_kdist(ctx, joint, len(indices), density_k, density_reference, seed,
                                              relative_to=density_relative_to, caption_from=img.shape[1],
                                              caption_k=density_caption_k, given_image_k=density_given_image_k)
        if given is not None:
            cols["log_kdist_given_image"] = given
    if repeat_k > 0:
        feats = pixel_signatures(ctx.data.images, mine, repeat_grid) if repeat_grid > 0 else img.float()
        cols["log_repeat"] = _log_kdist(ctx, feats.to(ctx.device), len(indices), repeat_k, density_reference, seed,
                                        metric="euclidean" if repeat_grid > 0 else "l2")[0]
    table = torch.stack(list(cols.values()), dim=1)
    if cache is not None:  # the features travel with the scores, gathered in one call
        table = torch.cat([table, img.float().cpu(), txt.float().cpu()], dim=1)
    elif keep_text:
        table = torch.cat([table, txt.float().cpu()], dim=1)
    out = _gather_in_order(table, len(indices), ctx)
    found = {name: out[:, i].contiguous() for i, name in enumerate(cols)}
    if cache is not None:
        found["features"] = out[:, len(cols):].contiguous()
    if keep_text:
        found["text"] = out[:, out.shape[1] - txt.shape[1]:].contiguous()
    return PairScores(**{name: found.get(name) for name in PairScores._fields})


def shard_similarities(ctx: TrainContext, indices: torch.Tensor, reference: torch.Tensor | None = None,
                       top_k: int = 10) -> torch.Tensor:
    """The similarity (or relative) score alone; see ``shard_pair_scores``."""
    return shard_pair_scores(ctx, indices, reference, top_k).score


def _median_and_spread(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The median and the robust standard deviation (1.4826 MAD) of ``x``, in float64."""
    x = x.double()
    med = x.median()
    return med, (x - med).abs().median() * 1.4826


def _low_cut(x: torch.Tensor, z: float) -> torch.Tensor:
    """``z`` robust standard deviations below the median of ``x`` (the median itself when the
    scores have no spread)."""
    med, spread = _median_and_spread(x)
    return med if float(spread) == 0.0 else med - z * spread


def inlier_fraction(scores: torch.Tensor, z: float) -> float:
    """Share of pairs whose score is at most ``z`` robust standard deviations below the median:
    the clean pairs form the bulk, poisoned pairs a long low tail."""
    x = scores.double()
    return float((x >= _low_cut(x, z)).double().mean())


def outlier_tail(scores: torch.Tensor, z: float) -> torch.Tensor:
    """bool per pair: the score is more than ``z`` robust standard deviations below the median (the
    pairs ``inlier_fraction`` leaves out)."""
    x = scores.double()
    return x < _low_cut(x, z)


def dense_inliers(log_kdist: torch.Tensor, z: float) -> torch.Tensor:
    """Pairs whose log k-distance is at most ``z`` robust standard deviations above the median:
    those with enough look-alike pairs."""
    x = log_kdist.double()
    med, spread = _median_and_spread(x)
    return x <= med + z * spread


def repeated_images(log_kdist: torch.Tensor, z: float) -> torch.Tensor:
    """Pairs whose image's log k-distance is more than ``z`` robust standard deviations below the
    median: images with k near-identical copies (an exact copy's distance is 0, log -27.6)."""
    x = log_kdist.double()
    med, spread = _median_and_spread(x)
    return x < med - z * spread
