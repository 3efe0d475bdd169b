"""Text features computed on the captions' tokens only, not on their padding.

Why: open_clip pads every caption to the model's context length (77 for ViT-B-32, 20 and 32
for cg-nano and cg-tiny) and runs the text transformer over the whole row. In its ``CLIP``
class the text mask is causal and the feature is read at the end-of-text token, so positions
after the longest caption of a batch never reach any feature: running the tower on the first
``L`` positions (``L`` the longest caption, rounded up to a multiple of 8 so a compiled model
sees few shapes) gives the same features and gradients, up to float rounding, for less work.
Fashion-MNIST captions are 6-16 tokens: ``cg-tiny`` (context 32) trains about a fifth faster on a
CPU (``benchmarks/train_throughput.py --trim-text``).

Installed per model instance by ``enable_text_trim``: ``create_model`` calls it on a GPU, or
anywhere with ``trim_text=True`` (the training setting ``trim_text``). The weights, their names and
open_clip's loading are untouched. Any other text tower, and a model where a probe does not give
open_clip's own features, keeps open_clip's ``encode_text``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("clipguard")

BUCKET = 8  # trimmed lengths are multiples of this (or the full row)


def trim_wanted(trim_text: bool | None, device: torch.device) -> bool:
    """The setting's meaning: True or False as given; None (the default) on CUDA devices only."""
    return trim_text if trim_text is not None else torch.device(device).type == "cuda"


def trimmed_length(text: torch.Tensor, bucket: int = BUCKET) -> int:
    """Positions to keep: through the batch's last end-of-text token (the row's largest id in
    open_clip's tokenizers), rounded up to ``bucket``, never more than the row."""
    full = int(text.shape[1])
    if full <= bucket or text.shape[0] == 0:
        return full
    last = int(text.argmax(dim=-1).max()) + 1
    return min(full, -(-last // bucket) * bucket)


def _supports(model: torch.nn.Module) -> bool:
    """open_clip's ``CLIP`` text tower with a causal mask, read at the end-of-text token."""
    from open_clip.model import CLIP

    return (isinstance(model, CLIP) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "positional_embedding", None) is not None
            and model.positional_embedding.ndim == 2)


def _encode_text_trimmed(self: torch.nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` on the first ``trimmed_length(text)`` positions."""
    n = trimmed_length(text)
    text = text[:, :n]
    cast = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast) + self.positional_embedding[:n].to(cast)
    x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
    x = self.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # the end-of-text token
    proj = self.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


@torch.no_grad()
def _agrees(model: torch.nn.Module) -> bool:
    """Whether the trimmed encoder gives open_clip's features on a probe of two short captions
    (guards against an open_clip whose ``encode_text`` does more than this module knows)."""
    ctx = int(model.positional_embedding.shape[0])
    if ctx <= BUCKET:
        return False
    vocab = int(model.token_embedding.num_embeddings)
    dev = model.positional_embedding.device
    probe = torch.zeros(2, ctx, dtype=torch.long, device=dev)
    probe[:, 0] = vocab - 2                    # start of text
    probe[0, 1:3] = torch.tensor([320, 1125])  # two ordinary tokens
    probe[0, 3] = probe[1, 1] = vocab - 1      # end of text: the largest id
    was_training = model.training
    model.eval()
    try:
        full = type(model).encode_text(model, probe)
        trimmed = _encode_text_trimmed(model, probe)
    finally:
        model.train(was_training)
    return bool(torch.allclose(full.float(), trimmed.float(), rtol=1e-4, atol=1e-5))


def enable_text_trim(model: torch.nn.Module) -> bool:
    """Make ``model.encode_text`` (and so ``model(image, text)``) skip the padding when that gives
    the same features; returns whether it does."""
    if not _supports(model):
        return False
    if not _agrees(model):
        log.debug("text trim: the probe's features differ from open_clip's; the model keeps its encode_text")
        return False
    # a partial of a module-level function, not a bound method: the model still pickles, and a
    # deepcopy (a frozen teacher, an EMA) gets its own copy bound to itself
    model.encode_text = functools.partial(_encode_text_trimmed, model)
    return True
