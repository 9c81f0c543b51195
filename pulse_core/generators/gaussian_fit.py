"""The Gaussian fit of a StyleGAN W space (pulse-reference.md section 2), for every family.

PULSE searches on a sphere in a whitened space and maps to W with
`w = LeakyReLU_0.2(v * std + mean)`; mean/std are those of the mapping network's outputs with the
final LeakyReLU undone (LeakyReLU with slope 5). The authors ship the fit as `gaussian_fit.pt` in the
legacy torch format with cuda-tagged tensors, so loading always maps to the CPU first.

One computation and one cache policy serve StyleGAN v1, StyleGAN2 (NVIDIA and rosinality) and
StyleGAN3; what differs between families is only the mapping's final activation
(`FinalActivation`: v1's plain LeakyReLU, NVIDIA's `lrelu` with its sqrt(2) gain), whose inverse
`compute_gaussian_fit` applies and whose forward `prior` applies again.

Where a computed fit is kept (`cached_gaussian_fit`):
`<cache>/.gaussian-fits/<sha256 of the model file>-n<samples>-s<seed>.pt`, never beside a user's
files, and never outliving the bytes it was computed from. A fit the authors ship beside their weights (`gaussian_fit.pt`) is an input, not a
cache entry: it is read where it is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


@dataclass(frozen=True)
class FinalActivation:
    """A mapping network's last activation, `gain * leaky_relu(x, slope)`, and its inverse.

    The fit is taken on `inverse(w)` and `prior` maps back with `forward`: the only part of the
    Gaussian fit that differs between StyleGAN families.
    """

    slope: float  # negative slope (1 = linear, 0 = ReLU, which has no inverse)
    gain: float  # output gain (sqrt(2) for NVIDIA's and rosinality's lrelu)

    @property
    def invertible(self) -> bool:
        return self.slope > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.slope == 1 else F.leaky_relu(x, self.slope)
        return y * self.gain if self.gain != 1 else y

    def inverse(self, w: torch.Tensor) -> torch.Tensor:
        if not self.invertible:
            raise ModelFileError(
                "the mapping network ends in a ReLU, which cannot be inverted: PULSE's Gaussian "
                "fit of W needs an invertible final activation"
            )
        x = w / self.gain if self.gain != 1 else w
        return x if self.slope == 1 else F.leaky_relu(x, 1.0 / self.slope)


LEAKY_RELU = FinalActivation(slope=0.2, gain=1.0)  # StyleGAN v1's mapping (the PULSE paper)
NVIDIA_LRELU = FinalActivation(slope=0.2, gain=math.sqrt(2.0))  # `bias_act` 'lrelu': StyleGAN2/3


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
    """Save atomically and fsynced (`pulse_core.atomic`): a crash never leaves half a fit.

    A fit costs 10^6 mapping calls; a torn file would make the next load fail, or be redone.
    """
    from pulse_core.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"mean": fit.mean.cpu(), "std": fit.std.cpu()}, tmp)


@torch.no_grad()
def compute_gaussian_fit(
    mapping: Callable[[torch.Tensor], torch.Tensor],  # z (n, z_dim) -> w (n, w_dim)
    z_dim: int = 512,
    samples: int | None = None,  # None = FIT_SAMPLES (10^6)
    seed: int = FIT_SEED,
    chunk: int = FIT_CHUNK,
    device: torch.device | str = "cpu",  # where z is sent: the mapping network's device
    progress: Callable[[int, int], None] | None = None,
    *,
    inverse: Callable[[torch.Tensor], torch.Tensor] = LEAKY_RELU.inverse,  # undoes the
    # mapping's final activation (`FinalActivation.inverse` of the family)
) -> GaussianFit:
    """Mean and unbiased std of inverse(mapping(z)), z ~ N(0, I), in chunks.

    The z's are drawn chunk after chunk from one CPU generator seeded with `seed`, so the result
    does not depend on the device, and memory stays at one chunk. Sums are kept in float64.
    """
    samples = FIT_SAMPLES if samples is None else samples
    if samples < 2:
        raise ValueError("a Gaussian fit needs at least 2 samples")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(0, dtype=torch.float64)
    total_sq = torch.zeros(0, dtype=torch.float64)
    done = 0
    while done < samples:
        n = min(chunk, samples - done)
        z = torch.randn(n, z_dim, generator=gen).to(device)
        x = inverse(mapping(z)).double().cpu()
        if total.numel() == 0:
            total = torch.zeros(x.shape[1], dtype=torch.float64)
            total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
        total += x.sum(0)
        total_sq += x.pow(2).sum(0)
        done += n
        if progress:
            progress(done, samples)
    mean = total / samples
    var = (total_sq - samples * mean.pow(2)) / (samples - 1)
    return GaussianFit(mean=mean.float(), std=var.clamp(min=0).sqrt().float())


# ----------------------------------------------------------------------------
# The one cache policy: where a computed fit is kept, and when it is computed again.


def fit_cache_path(checksum: str, samples: int, seed: int) -> Path:
    """Where the fit of the model with this sha256 is kept: `<cache>/.gaussian-fits/...`.

    Hidden (ignored by the catalogue's folder digests) and keyed by the model's checksum, so a
    fit never lands beside a user's files and never outlives the bytes it was computed from.
    """
    from pulse_core.generators.cache import cache_dir  # cache.py pulls in the download code

    return cache_dir() / ".gaussian-fits" / f"{checksum}-n{samples}-s{seed}.pt"


def load_cached_fit(checksum: str | None, samples: int, seed: int) -> GaussianFit | None:
    """The fit cached for the model file with this sha256, if any (None on any problem)."""
    if not checksum:
        return None
    with contextlib.suppress(ModelFileError, OSError):
        path = fit_cache_path(checksum, samples, seed)
        if path.is_file():
            return load_gaussian_fit(path)
    return None


def store_cached_fit(fit: GaussianFit, checksum: str | None, samples: int, seed: int) -> None:
    """Keep a fit for the model file with this sha256 (silently skipped if the cache is
    read-only: it is recomputed next time)."""
    if not checksum:
        return
    with contextlib.suppress(ModelFileError, OSError):
        save_gaussian_fit(fit, fit_cache_path(checksum, samples, seed))


def cached_gaussian_fit(
    compute: Callable[[], GaussianFit],  # computes this model's fit of `samples` z's from `seed`
    checksum: str | None,  # sha256 of the file the mapping came from; None = no caching
    samples: int = FIT_SAMPLES,
    seed: int = FIT_SEED,
    *,
    dims: int | None = None,  # the network's w size: a cached fit of another size is redone
    use_cache: bool = True,  # False: compute, and neither read nor write the cache
) -> GaussianFit:
    """This model's fit from the cache, or computed once and cached: the policy of every family.

    Computing costs minutes on a CPU (10^6 mapping calls); two processes that miss at once both
    compute and the last atomic write wins, which costs time, never a torn file.
    """
    fit = load_cached_fit(checksum, samples, seed) if use_cache else None
    if fit is None or (dims is not None and fit.mean.shape != (dims,)):
        fit = compute()
        if use_cache:
            store_cached_fit(fit, checksum, samples, seed)
    return fit


class FittableGenerator(Protocol):
    """What `ensure_gaussian_fit` needs of a generator (`StyleGenerator` has it)."""

    @property
    def latent_dim(self) -> int: ...

    def compute_gaussian_fit(self, samples: int = ..., seed: int = ...) -> GaussianFit: ...

    def set_gaussian_fit(self, fit: GaussianFit) -> None: ...


def ensure_gaussian_fit(
    generator: FittableGenerator,
    checksum: str | None,  # sha256 of the model file: the fit's cache key (None = no caching)
    samples: int = FIT_SAMPLES,
    seed: int = FIT_SEED,
    use_cache: bool = True,
) -> GaussianFit:
    """Give `generator` its fit (`cached_gaussian_fit`), at load time, before it is shared."""
    fit = cached_gaussian_fit(
        lambda: generator.compute_gaussian_fit(samples=samples, seed=seed),
        checksum,
        samples,
        seed,
        dims=generator.latent_dim,
        use_cache=use_cache,
    )
    generator.set_gaussian_fit(fit)
    return fit
