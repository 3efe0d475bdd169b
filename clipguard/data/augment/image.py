"""Batched SimCLR-style image augmentation for in-modal contrastive losses.

Why our own: per-sample torchvision transforms loop in Python; this draws every random number
for the whole batch from one ``torch.Generator`` (seeded per step, so resume is exact) and
applies crop + flip through a single ``grid_sample``, colour jitter and grayscale as tensor
arithmetic. Each sample gets its own crop, flip, jitter factors and grayscale coin.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _wrap(a: torch.Tensor, period: float) -> torch.Tensor:
    """``a % period`` for ``a`` in [-period, 2 * period), bit for bit (a float remainder takes
    fmod, exact, and adds the period to a negative rest), at a fraction of its cost: one
    subtraction (exact there) or one addition, chosen per element."""
    return torch.where(a < 0, a + period, torch.where(a >= period, a - period, a))


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's hue by ``shift`` (m,1,1,1, in turns): RGB to HSV, add, back to RGB.
    One pass over the channels as separate planes (no stacking, element-wise max and min instead
    of reductions with indices): the arithmetic of the textbook round trip, in the same order."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), 0.0)
    d = delta.clamp_min(1e-8)
    gb = (g - b) / d
    h = torch.where(maxc == r, _wrap(gb, 6.0), torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6.0, 0.0)
    h = _wrap(h + shift.view(-1, 1, 1), 1.0)
    # back to RGB by the closed form f(n) = v - v*s*max(0, min(k, 4-k, 1)), k = (n + h*6) mod 6
    kk = _wrap(torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
               + h.unsqueeze(1) * 6, 6.0)
    f = torch.clamp(torch.minimum(kk, 4 - kk), 0, 1)
    v = maxc.unsqueeze(1)
    return v - v * s.unsqueeze(1) * f


def _crop_flip(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float],
               ratio: tuple[float, float], flip_p: float, n: int, rows: torch.Tensor | None) -> torch.Tensor:
    """Random resized crop + horizontal flip as one affine resampling per sample. The draws are
    made for all ``n`` samples of the batch; ``x`` holds the ``rows`` among them (all if None)."""
    area = _uniform(n, scale[0], scale[1], g)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)   # fraction of the width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=g) - 1)  # centre in [-(1-w), 1-w]
    cy = (1 - h) * (2 * torch.rand(n, generator=g) - 1)
    flip = torch.where(torch.rand(n, generator=g) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    if rows is not None:
        theta = theta[rows]
    if x.shape[0] == 0:  # grid_sample refuses an empty batch; the draws above are made all the same
        return x
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _color_jitter(x: torch.Tensor, g: torch.Generator, jitter: tuple[float, float, float, float],
                  p: float, n: int, rows: torch.Tensor | None) -> torch.Tensor:
    """Brightness, contrast, saturation, hue with per-sample factors, in a per-batch random order
    (drawn for all ``n`` samples; ``x`` holds the ``rows`` among them)."""
    b, c, s, hue = jitter
    fb = _uniform(n, max(0.0, 1 - b), 1 + b, g)
    fc = _uniform(n, max(0.0, 1 - c), 1 + c, g)
    fs = _uniform(n, max(0.0, 1 - s), 1 + s, g)
    fh = _uniform(n, -hue, hue, g)
    apply = torch.rand(n, generator=g) < p
    order = torch.randperm(4, generator=g).tolist()
    if rows is not None:
        fb, fc, fs, fh, apply = (t[rows] for t in (fb, fc, fs, fh, apply))
    # only the jittered samples are computed (every op works per sample, so theirs are those of
    # the whole batch); the others keep their pixels
    sel = apply.nonzero().squeeze(1)
    if len(sel) == 0:
        return x
    dev = dict(device=x.device, dtype=x.dtype)
    fb, fc, fs, fh = (t[sel].to(**dev).view(-1, 1, 1, 1) for t in (fb, fc, fs, fh))
    sel = sel.to(x.device)
    y = x[sel]
    for op in order:
        if op == 0 and b > 0:
            y = (y * fb).clamp(0, 1)
        elif op == 1 and c > 0:
            mean = _gray(y).mean(dim=(2, 3), keepdim=True)
            y = ((y - mean) * fc + mean).clamp(0, 1)
        elif op == 2 and s > 0:
            gr = _gray(y)
            y = ((y - gr) * fs + gr).clamp(0, 1)
        elif op == 3 and hue > 0:
            y = _hue_jitter(y, fh)
    return x.index_copy(0, sel, y)


def _hue_jitter(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``_shift_hue(y, shift).clamp(0, 1)``, computed only for the samples that have colour.

    A grey sample (R = G = B at every pixel) is a fixed point of the hue rotation, bit for bit:
    its saturation is exactly 0, so the round trip returns max(R, G, B), the pixel itself. The
    brightness, contrast and saturation steps keep a grey sample grey, so on greyscale data
    (Fashion-MNIST, MNIST, scans) the most expensive step of the jitter is skipped for every clean
    image, and the views are the same as the full computation's."""
    colour = ((y[:, 0] != y[:, 1]) | (y[:, 1] != y[:, 2])).flatten(1).any(1)
    idx = colour.nonzero().squeeze(1)
    if len(idx) == len(y):
        return _shift_hue(y, shift).clamp(0, 1)
    out = y.clamp(0, 1)
    if len(idx):
        out[idx] = _shift_hue(y[idx], shift[idx]).clamp(0, 1)
    return out


def simclr_augment(pixels: torch.Tensor, generator: torch.Generator, *,
                   scale: tuple[float, float] = (0.08, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   flip_p: float = 0.5,
                   jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                   jitter_p: float = 0.8,
                   gray_p: float = 0.2,
                   blur_p: float = 0.0,
                   blur_sigma: tuple[float, float] = (0.1, 2.0),
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR view of a batch: (B,3,H,W) floats in [0,1] -> same shape, in [0,1].

    Randomness comes only from ``generator`` (a CPU generator; draws are moved to the pixels'
    device), so the same generator state gives the same views on every device.

    ``rows`` (indices into the batch): only those samples' views, (len(rows),3,H,W), exactly
    those of the full call, which draws the same random numbers for every sample of the batch
    and leaves the generator in the same state. A caller that needs views of part of a batch
    (SafeCLIP's risky pairs) pays for the transforms of that part only, and its sequence of
    random numbers does not depend on which part.

    ``blur_p``: the share of views also blurred (SimCLR's Gaussian blur: sigma uniform in
    ``blur_sigma``, a kernel a tenth of the image side, at least 3). At 0 (the default) nothing is
    drawn for it, so the views and the generator's state are those of the call without it.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"simclr_augment expects (B,3,H,W) pixels, got {tuple(pixels.shape)}")
    if not 0.0 <= jitter[3] <= 0.5:
        raise ValueError(f"simclr_augment: the hue jitter must be in [0, 0.5] (half a turn each way at most), got {jitter[3]}")
    n = pixels.shape[0]
    if n == 0:
        return pixels.clone()
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
    x = (pixels if rows is None else pixels[rows.to(pixels.device)]).float()
    x = _crop_flip(x, generator, scale, ratio, flip_p, n, rows)
    x = _color_jitter(x, generator, jitter, jitter_p, n, rows)
    gray = torch.rand(n, generator=generator) < gray_p
    if rows is not None:
        gray = gray[rows]
    sel = gray.nonzero().squeeze(1).to(x.device)
    if len(sel):
        x = x.index_copy(0, sel, _gray(x[sel]).expand(-1, x.shape[1], -1, -1))
    if blur_p > 0:
        x = _blur(x, generator, blur_p, blur_sigma, n, rows)
    return x.clamp(0, 1).to(pixels.dtype)


def _blur(x: torch.Tensor, generator: torch.Generator, p: float, sigma: tuple[float, float], n: int,
          rows: torch.Tensor | None) -> torch.Tensor:
    """A separable Gaussian blur on a random ``p`` share of the views (draws for all ``n``)."""
    apply = torch.rand(n, generator=generator) < p
    sig = torch.empty(n).uniform_(sigma[0], sigma[1], generator=generator)
    if rows is not None:
        apply, sig = apply[rows], sig[rows]
    if not bool(apply.any()):
        return x
    size = max(3, int(round(0.1 * x.shape[-1])) | 1)
    r = torch.arange(size, dtype=torch.float32) - size // 2
    sel = apply.nonzero().squeeze(1)  # only the chosen views are convolved
    k = torch.exp(-(r.view(1, -1) ** 2) / (2 * sig[sel].view(-1, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).to(x.device, x.dtype)  # (m, size): one kernel per blurred view
    sel = sel.to(x.device)
    _, c, h, w = x.shape
    m = len(sel)
    pad = size // 2
    y = torch.nn.functional.pad(x[sel].reshape(1, m * c, h, w), (pad, pad, pad, pad), mode="reflect")
    kc = k.repeat_interleave(c, 0)  # (m*c, size)
    y = torch.nn.functional.conv2d(y, kc.view(m * c, 1, 1, size), groups=m * c)
    y = torch.nn.functional.conv2d(y, kc.view(m * c, 1, size, 1), groups=m * c).view(m, c, h, w)
    out = x.clone()
    out[sel] = y
    return out
