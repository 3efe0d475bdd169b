"""``--device``: checked up front, so a missing GPU is one clear line, not a CUDA traceback."""

from __future__ import annotations

import re

import torch

from clipguard.errors import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(?::(\d+))?)$")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (a CUDA GPU when one is visible, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps' as a
    ``torch.device``; ConfigError when the name is unknown or the device is not there."""
    text = str(name if name is not None else "auto").strip().lower()
    m = _DEVICE.match(text)
    if m is None:
        raise ConfigError(f"--device {name}: unknown device; use {DEVICES}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("--device mps but no Apple MPS device is available; use --device cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {text} but no CUDA GPU is visible "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")
    if m.group(2) is not None:
        index, count = int(m.group(2)), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"--device {text} but only {count} CUDA GPU(s) are visible "
                              f"(cuda:0..cuda:{count - 1})")
    return torch.device(text)
