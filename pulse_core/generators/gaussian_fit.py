"""The Gaussian fit of a StyleGAN W space (pulse-reference.md section 2).

PULSE searches on a sphere in a whitened space and maps to W with
`w = LeakyReLU_0.2(v * std + mean)`; mean/std are those of the mapping network's outputs with the
final LeakyReLU undone (LeakyReLU with slope 5). The authors ship the fit as `gaussian_fit.pt` in the
legacy torch format with cuda-tagged tensors, so loading always maps to the CPU first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pulse_core.errors import ModelFileError

FIT_SAMPLES = 1_000_000
FIT_SEED = 0
FIT_CHUNK = 10_000


@dataclass
class GaussianFit:
    mean: torch.Tensor  # (w_dim,)
    std: torch.Tensor  # (w_dim,)


def load_gaussian_fit(path: Path) -> GaussianFit:
    """Load {"mean", "std"} from any torch format (legacy or zip), mapping CUDA tensors to CPU."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ModelFileError(f"cannot read Gaussian fit {path}: {exc}") from None
    if not isinstance(data, dict) or not {"mean", "std"} <= set(data):
        raise ModelFileError(f"{path} is not a Gaussian fit: expected a dict with 'mean' and 'std'")
    mean, std = data["mean"].float().reshape(-1), data["std"].float().reshape(-1)
    if mean.shape != std.shape:
        raise ModelFileError(f"{path}: mean {tuple(mean.shape)} and std {tuple(std.shape)} differ")
    return GaussianFit(mean=mean, std=std)


def save_gaussian_fit(fit: GaussianFit, path: Path) -> None:
    """Save atomically (temp file, then rename) so a crash never leaves a half-written fit."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"mean": fit.mean.cpu(), "std": fit.std.cpu()}, tmp)
    tmp.replace(path)


@torch.no_grad()
def compute_gaussian_fit(
    mapping: Callable[[torch.Tensor], torch.Tensor],
    z_dim: int = 512,
    samples: int | None = None,  # None = FIT_SAMPLES (10^6)
    seed: int = FIT_SEED,
    chunk: int = FIT_CHUNK,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> GaussianFit:
    """Mean and unbiased std of LeakyReLU_5(mapping(z)), z ~ N(0, I), in chunks.

    The z's are drawn chunk after chunk from one CPU generator seeded with `seed`, so the result
    does not depend on the device, and memory stays at one chunk. Sums are kept in float64.
    """
    samples = FIT_SAMPLES if samples is None else samples
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(0, dtype=torch.float64)
    total_sq = torch.zeros(0, dtype=torch.float64)
    done = 0
    while done < samples:
        n = min(chunk, samples - done)
        z = torch.randn(n, z_dim, generator=gen).to(device)
        x = F.leaky_relu(mapping(z), 5.0).double().cpu()
        if total.numel() == 0:
            total = torch.zeros(x.shape[1], dtype=torch.float64)
            total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
        total += x.sum(0)
        total_sq += x.pow(2).sum(0)
        done += n
        if progress:
            progress(done, samples)
    mean = total / samples
    var = (total_sq - samples * mean.pow(2)) / max(samples - 1, 1)
    return GaussianFit(mean=mean.float(), std=var.clamp(min=0).sqrt().float())
