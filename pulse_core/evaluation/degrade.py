"""Seeded degradations of an LR image: the paper's robustness experiment, reproducible.

PULSE is judged on how the search copes when the LR image is not exactly DS(some face): sensor
noise, blur, impulse noise and compression. Each degradation is applied to the clean 8-bit LR
input and rounded to 8 bits again (what a file would hold). Its randomness comes from a seed
derived from (base seed, input key, factor, name), so a re-run degrades every input the same way
and two inputs never share a noise pattern.

Names (`--degrade`, comma-separated):

| name            | what                                                            |
|-----------------|-----------------------------------------------------------------|
| `noise<N>`      | additive Gaussian noise, sigma N/255 (`noise25`, `noise50`)      |
| `blur[<S>]`     | Gaussian blur, sigma S LR pixels (default 1.0), edges replicated |
| `saltpepper[<P>]` | P percent of pixels (default 5) set to black or white          |
| `jpeg[<Q>]`     | JPEG round trip at quality Q (default 30; Pillow, 4:2:0)         |
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pulse_core.errors import ConfigError
from pulse_core.evaluation.metrics import quantise

CLEAN = "clean"
_PATTERN = re.compile(r"^(noise|blur|saltpepper|jpeg)(\d+(?:\.\d+)?)?$")
_DEFAULTS = {"blur": 1.0, "saltpepper": 5.0, "jpeg": 30.0}


@dataclass(frozen=True)
class Degradation:
    """One parsed degradation name."""

    kind: str  # noise | blur | saltpepper | jpeg
    amount: float  # sigma in levels, blur sigma in px, percent, or JPEG quality
    name: str  # as given (the label in tables)


def parse(name: str) -> Degradation:
    """`noise25` -> Degradation("noise", 25); unknown names list the valid forms."""
    m = _PATTERN.match(name.strip().lower())
    if m is None:
        raise ConfigError(
            f"unknown degradation {name!r}; use noise<N> (sigma N/255), blur[<sigma px>], "
            "saltpepper[<percent>] or jpeg[<quality>], e.g. noise25,blur,jpeg"
        )
    kind, amount = m.group(1), m.group(2)
    if amount is None:
        if kind == "noise":
            raise ConfigError("noise needs its sigma in 8-bit levels, e.g. noise25")
        value = _DEFAULTS[kind]
    else:
        value = float(amount)
    if kind == "jpeg" and not 1 <= value <= 95:
        raise ConfigError(f"jpeg quality must be 1..95, got {value:g}")
    if kind == "saltpepper" and not 0 < value <= 100:
        raise ConfigError(f"saltpepper percent must be in (0, 100], got {value:g}")
    if kind in ("noise", "blur") and value <= 0:
        raise ConfigError(f"{kind} amount must be > 0, got {value:g}")
    return Degradation(kind, value, name.strip().lower())


def degradation_seed(base_seed: int, key: str, factor: int, name: str) -> int:
    """A 63-bit seed per (base seed, input, factor, degradation)."""
    text = f"pulse-eval:{int(base_seed)}:{factor}:{name}:{key}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def degrade(lr: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    """The degraded copy of a (3, h, w) LR image in [0, 1], 8-bit rounded; `clean` = as is."""
    if name == CLEAN:
        return quantise(lr)
    d = parse(name)
    rng = torch.Generator().manual_seed(int(seed))
    x = lr.detach().float().cpu()
    if d.kind == "noise":
        out = x + torch.randn(x.shape, generator=rng) * (d.amount / 255.0)
    elif d.kind == "blur":
        out = _gaussian_blur(x, d.amount)
    elif d.kind == "saltpepper":
        u = torch.rand(x.shape[1:], generator=rng)
        salt = torch.rand(x.shape[1:], generator=rng) < 0.5
        hit = u < d.amount / 100
        out = x.clone()
        out[:, hit & salt] = 1.0
        out[:, hit & ~salt] = 0.0
    else:
        out = _jpeg(x, int(d.amount))
    return quantise(out)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    a = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a), mode="RGB").save(buf, format="JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(back.transpose(2, 0, 1).copy()) / 255.0


__all__ = ["CLEAN", "Degradation", "degradation_seed", "degrade", "parse"]
