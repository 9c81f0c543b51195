"""Differentiable forward operators DS: high-resolution image -> low-resolution image.

PULSE only asks that DS(G(w)) matches the input; the operator is a per-job choice. `bicubic`
is the reference's antialiased Keys kernel (pulse-reference.md section 5) and is the default;
`area`, `gaussian` (blur then decimate) and `nearest` model other degradations.

Factor 1 is treated as the identity for every operator (the reference bicubic would shift the
image by half a pixel, which is never what a caller of factor 1 wants).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from pulse_core.errors import ConfigError

Operator = Literal["bicubic", "area", "gaussian", "nearest"]  # the choices, declared once
OPERATORS: tuple[str, ...] = get_args(Operator)


def keys_cubic(x: float, a: float = -0.5) -> float:
    """Keys' cubic convolution kernel W(x) with parameter a (a = -0.5: Catmull-Rom)."""
    ax = abs(x)
    if ax <= 1.0:
        return (a + 2.0) * ax**3 - (a + 3.0) * ax**2 + 1.0
    if ax < 2.0:
        return a * ax**3 - 5.0 * a * ax**2 + 8.0 * a * ax - 4.0 * a
    return 0.0


def bicubic_taps(factor: int) -> torch.Tensor:
    """The 4f normalised taps of the antialiased bicubic kernel stretched by `factor`."""
    size = 4 * factor
    taps = [keys_cubic((i - math.floor(size / 2) + 0.5) / factor) for i in range(size)]
    k = torch.tensor(taps, dtype=torch.float64)
    return (k / k.sum()).to(torch.float32)


def gaussian_taps(factor: int) -> torch.Tensor:
    """Gaussian taps with sigma = factor / 2 over 4f samples (even length, centred like bicubic)."""
    size = 4 * factor
    sigma = factor / 2.0
    xs = [(i - size / 2 + 0.5) for i in range(size)]
    k = torch.tensor([math.exp(-0.5 * (x / sigma) ** 2) for x in xs], dtype=torch.float64)
    return (k / k.sum()).to(torch.float32)


@functools.lru_cache(maxsize=64)
def _resample_matrix(
    taps: tuple[float, ...], factor: int, n_in: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(n_in // factor, n_in) matrix of one strided 1-D pass, reflect padding folded in.

    Row o holds taps[k] at input index reflect(o * factor + k - before): exactly the padded,
    strided 1-D conv below, as one dense product (taps that reflect onto the same pixel add up).
    """
    size = len(taps)
    before = (size - factor) // 2
    n_out = n_in // factor
    pos = torch.arange(n_out)[:, None] * factor + torch.arange(size)[None, :] - before
    pos = torch.where(pos < 0, -pos, pos)
    pos = torch.where(pos >= n_in, 2 * (n_in - 1) - pos, pos)
    rows = torch.arange(n_out)[:, None].expand(n_out, size)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    k = torch.tensor(taps, dtype=torch.float64).expand(n_out, size)
    m.index_put_((rows.reshape(-1), pos.reshape(-1)), k.reshape(-1), accumulate=True)
    return m.to(device=device, dtype=dtype)


# Dense products beat oneDNN's depthwise conv with a 4f-tall kernel by 2-20x at every size
# measured (64..1024 px, factors 2..64); past this many matrix entries the conv is kept.
_MATMUL_MAX_ENTRIES = 1 << 22


def _separable(x: torch.Tensor, taps: torch.Tensor, factor: int) -> torch.Tensor:
    """Reflect-pad, then a strided depthwise 1-D filter along H, then the same along W."""
    _, c, h, w = x.shape
    size = taps.numel()
    pad = size - factor
    before, after = pad // 2, pad - pad // 2
    if min(h, w) <= max(before, after):
        raise ConfigError(
            f"image of {h}x{w} is too small for downscale factor {factor}: "
            f"each side must exceed {max(before, after)} pixels"
        )
    if max(h, w) ** 2 // factor <= _MATMUL_MAX_ENTRIES:
        key = tuple(taps.tolist())
        mh = _resample_matrix(key, factor, h, x.device, x.dtype)
        mw = _resample_matrix(key, factor, w, x.device, x.dtype)
        return torch.matmul(torch.matmul(mh, x), mw.t())
    k = taps.to(device=x.device, dtype=x.dtype)
    kh = k.view(1, 1, size, 1).expand(c, 1, size, 1)
    kw = k.view(1, 1, 1, size).expand(c, 1, 1, size)
    x = F.pad(x, (0, 0, before, after), mode="reflect")
    x = F.conv2d(x, kh, stride=(factor, 1), groups=c)
    x = F.pad(x, (before, after, 0, 0), mode="reflect")
    return F.conv2d(x, kw, stride=(1, factor), groups=c)


def bicubic(x: torch.Tensor, factor: int) -> torch.Tensor:
    return _separable(x, bicubic_taps(factor), factor)


def gaussian(x: torch.Tensor, factor: int) -> torch.Tensor:
    return _separable(x, gaussian_taps(factor), factor)


def area(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=factor, stride=factor)


def nearest(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pick the pixel just below-right of each block's centre (what most scanners' decimators do)."""
    off = factor // 2
    return x[:, :, off::factor, off::factor]


_OPS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "bicubic": bicubic,
    "area": area,
    "gaussian": gaussian,
    "nearest": nearest,
}


def get_operator(name: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Look up a forward operator by name; unknown names list the valid ones."""
    try:
        return _OPS[name]
    except KeyError:
        raise ConfigError(
            f"unknown forward operator {name!r}; choose one of: {', '.join(OPERATORS)}"
        ) from None


def downscale(x: torch.Tensor, factor: int, operator: str = "bicubic") -> torch.Tensor:
    """Downscale a batch (N, C, H, W) by an integer factor with the named operator."""
    if x.ndim != 4:
        raise ConfigError(f"expected an image batch of shape (N, C, H, W), got {tuple(x.shape)}")
    if not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"downscale factor must be a positive integer, got {factor!r}")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ConfigError(f"image of {h}x{w} is not divisible by downscale factor {factor}")
    op = get_operator(operator)
    if factor == 1:
        return x
    return op(x, factor)
