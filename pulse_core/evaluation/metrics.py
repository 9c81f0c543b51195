"""Full-reference and consistency metrics on (3, H, W) images in [0, 1].

- LR consistency (what PULSE promises): MSE and PSNR of DS(SR) against the LR image the
  search saw (degraded) and against the clean one; "within eps" uses the search's own eps on
  the first. This is the number PULSE optimises.
- PSNR / SSIM against the ground truth: reported, never optimised for. PULSE does not aim at the
  truth (many HR images explain one LR image), so a better realism often costs PSNR.
- Diversity: mean pairwise RMS distance between the samples of one input, in [0, 1] units: 0
  when every restart lands on the same image.

Every function works down to 2x2 images (SSIM shrinks its window to the image).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pulse_core.downscale import downscale

SSIM_WINDOW = 11  # Wang et al. 2004: 11x11 Gaussian, sigma 1.5, on luma
SSIM_SIGMA = 1.5


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error of two images of one shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.double() - b.double()).pow(2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [0, 1] (peak 1); inf for identical images."""
    m = mse(a, b)
    return math.inf if m == 0 else 10 * math.log10(1.0 / m)


def psnr_of_mse(m: float) -> float:
    return math.inf if m <= 0 else 10 * math.log10(1.0 / m)


def luma(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of (..., 3, H, W)."""
    return 0.299 * x[..., 0, :, :] + 0.587 * x[..., 1, :, :] + 0.114 * x[..., 2, :, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM (Wang et al. 2004) on luma: Gaussian window, valid area, C1/C2 for peak 1.

    The window is 11x11 (sigma 1.5) or, for images smaller than that, the largest odd size
    that fits, with sigma scaled alike: a 4x4 image still gets a number.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = luma(a.double())[None, None], luma(b.double())[None, None]
    side = min(SSIM_WINDOW, int(min(x.shape[-2:])))
    side -= 1 - side % 2  # odd
    sigma = SSIM_SIGMA * side / SSIM_WINDOW
    r = torch.arange(side, dtype=torch.float64) - side // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(m.mean())


def lr_consistency(
    hr: torch.Tensor,
    lr_seen: torch.Tensor,
    lr_clean: torch.Tensor,
    factor: int,
    operator: str,
    eps: float,
) -> dict[str, float | bool]:
    """MSE/PSNR of DS(hr) against the LR the search saw and the clean LR; within eps (seen)."""
    down = downscale(hr.clamp(0, 1)[None].float(), factor, operator)[0]
    seen, clean = mse(down, lr_seen), mse(down, lr_clean)
    return {
        "lr_mse": seen,
        "lr_psnr": psnr_of_mse(seen),
        "lr_mse_clean": clean,
        "lr_psnr_clean": psnr_of_mse(clean),
        "within_eps": seen <= eps,
    }


def diversity(samples: Sequence[torch.Tensor]) -> float | None:
    """Mean pairwise RMS distance between samples of one input ([0, 1] units); None if < 2."""
    if len(samples) < 2:
        return None
    dists = [
        math.sqrt(mse(a.clamp(0, 1), b.clamp(0, 1))) for a, b in itertools.combinations(samples, 2)
    ]
    return sum(dists) / len(dists)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels (what a PNG holds), staying in [0, 1] floats."""
    return (x.clamp(0, 1) * 255).round() / 255


__all__ = [
    "diversity",
    "lr_consistency",
    "luma",
    "mse",
    "psnr",
    "psnr_of_mse",
    "quantise",
    "ssim",
]
