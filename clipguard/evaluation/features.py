"""Batched feature extraction shared by training hooks and every evaluation."""

from __future__ import annotations

import torch

from clipguard.tensors import normalize, to_pixels


@torch.no_grad()
def encode_images(model: torch.nn.Module, images_u8, device: torch.device | str,
                  batch_size: int = 512, indices: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised image features (float32, on CPU) of uint8 images.

    ``images_u8`` is a tensor or LazyImages; ``indices`` selects rows batch by batch, so lazy
    data is never decoded all at once.
    """
    was = model.training
    model.eval()
    out = []
    n = len(indices) if indices is not None else len(images_u8)
    for i in range(0, n, batch_size):
        chunk = images_u8[indices[i:i + batch_size]] if indices is not None else images_u8[i:i + batch_size]
        px = to_pixels(chunk, torch.device(device))
        out.append(model.encode_image(normalize(px), normalize=True).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor, device: torch.device | str,
                  batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text features (float32, on CPU) of tokenised captions.

    A caption that repeats (a templated dataset repeats many: 30% of 4,000 Fashion-MNIST pairs'
    captions) is encoded once. A row's features do not depend on the other rows of its batch (on
    the CPU the same bits: each layer works row by row), so this changes the time, not the result."""
    if len(tokens) > 1:
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        if len(unique) < len(tokens):
            return _encode_token_rows(model, unique, device, batch_size)[inverse.cpu()]
    return _encode_token_rows(model, tokens, device, batch_size)


def _encode_token_rows(model: torch.nn.Module, tokens: torch.Tensor, device: torch.device | str,
                       batch_size: int) -> torch.Tensor:
    was = model.training
    model.eval()
    out = [model.encode_text(tokens[i:i + batch_size].to(device), normalize=True).float().cpu()
           for i in range(0, len(tokens), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer, texts: list[str], device: torch.device | str,
                 batch_size: int = 512) -> torch.Tensor:
    return encode_tokens(model, tokenizer(texts), device, batch_size)
