"""Device choice: never hard-coded; "auto" takes the best the machine has."""

from __future__ import annotations

import torch

from pulse_core.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` = cuda, else mps, else cpu; anything else is checked to exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device here")
    return device
