"""NIQE (Mittal, Soundararajan and Bovik 2013, "Making a completely blind image quality analyzer").

The paper's Table 2 metric (lower = more natural). Our own implementation of the published
algorithm (the MATLAB release's steps, restated, no code copied), scored against the pristine
model the authors fitted on natural images, taken as `niqe_pris_params.npz` from the basicsr
1.4.2 sdist (`pulse models pull niqe`, see `pulse_core.evaluation.assets`):

1. the image's luma as MATLAB's `rgb2ycbcr` gives it (16..235), rounded to integers;
2. at two scales (the image, then MATLAB's `imresize(., 0.5)`: antialiased Keys bicubic with
   symmetric edges), MSCN coefficients with the model's 7x7 Gaussian window (edges replicated):
   `(I - mu) / (sigma + 1)`;
3. per block (96x96 at full scale, 48x48 at half), 18 features: an asymmetric generalised
   Gaussian fitted to the coefficients and to their products with 4 neighbours;
4. a multivariate Gaussian fitted to the blocks' 36-vectors; the score is the distance between
   it and the pristine one: `sqrt((mu_p - mu) @ pinv((cov_p + cov) / 2) @ (mu_p - mu))`.

Two uses:
- `niqe(image)`: the score of one image with at least two 96x96 blocks (the paper scored
  1024x1024 outputs: 100 blocks).
- `niqe_set(features)`: a generator of 64x64 faces has no 96x96 block, so each small image is
  upsampled (bicubic) to one 96x96 block (`image_blocks`) and the Gaussian is fitted over the
  blocks of a whole set of images (one method at one factor): a set-level score, pooled the way
  NIQE pools the blocks of one large image. Absolute values are not comparable with published
  1024 px numbers; differences between methods on the same set are what counts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from pulse_core.downscale import bicubic_taps

BLOCK = 96  # the pristine model's block side at full scale
FEATURES = 36  # 18 per scale
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical, two diagonals
_AGGD_GRID = np.arange(0.2, 10.001, 0.001)  # candidate shape parameters, as in the release


@functools.lru_cache(maxsize=1)
def _aggd_ratio() -> np.ndarray:
    g = _AGGD_GRID
    gamma = np.vectorize(math.gamma)
    return gamma(2 / g) ** 2 / (gamma(1 / g) * gamma(3 / g))


def aggd_params(x: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching (Lasmar et al. 2009).

    Returns (alpha, beta_left, beta_right): the shape and the two scales; a Gaussian gives
    alpha = 2 and equal scales. NaNs when a side is empty (a flat block).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    neg, pos = x[x < 0], x[x > 0]
    if not len(neg) or not len(pos):
        return (math.nan, math.nan, math.nan)
    left, right = math.sqrt(np.mean(neg**2)), math.sqrt(np.mean(pos**2))
    gam = left / right
    r = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
    rnorm = r * (gam**3 + 1) * (gam + 1) / (gam**2 + 1) ** 2
    alpha = float(_AGGD_GRID[np.argmin((_aggd_ratio() - rnorm) ** 2)])
    k = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return (alpha, left * k, right * k)


def _filter_replicate(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Correlate with a small window, edge pixels repeated outside the image."""
    kh, kw = window.shape
    padded = np.pad(img, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge")
    views = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw))
    return np.einsum("ijkl,kl->ij", views, window)


def mscn(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Mean-subtracted, contrast-normalised coefficients of a 2-D image (0..255 scale)."""
    mu = _filter_replicate(img, window)
    sigma = np.sqrt(np.abs(_filter_replicate(img * img, window) - mu * mu))
    return (img - mu) / (sigma + 1)


def block_features(coeffs: np.ndarray) -> list[float]:
    """The 18 features of one block of MSCN coefficients."""
    alpha, bl, br = aggd_params(coeffs)
    feats = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        alpha, bl, br = aggd_params(coeffs * np.roll(coeffs, shift, axis=(0, 1)))
        mean = (br - bl) * math.gamma(2 / alpha) / math.gamma(1 / alpha) if alpha == alpha else 0
        feats += [alpha, mean, bl, br]
    return feats


def matlab_luma(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> MATLAB rgb2ycbcr's Y (16..235), rounded, float64."""
    x = rgb.detach().double().clamp(0, 1)
    y = 16 + 65.481 * x[0] + 128.553 * x[1] + 24.966 * x[2]
    return y.round().cpu().numpy()


def _half_matrix(n: int) -> np.ndarray:
    """(n // 2, n) matrix of MATLAB's imresize(0.5) along one axis: 8 Keys taps, mirrored edges."""
    taps = bicubic_taps(2).double().numpy()
    m = np.zeros((n // 2, n))
    for o in range(n // 2):
        for k, w in enumerate(taps):
            j = 2 * o + k - 3  # taps centred on 2o + 0.5
            if j < 0:
                j = -j - 1  # symmetric: -1 -> 0, -2 -> 1
            elif j >= n:
                j = 2 * n - j - 1
            m[o, j] += w
    return m


def half_scale(img: np.ndarray) -> np.ndarray:
    """MATLAB imresize(img, 0.5) (bicubic, antialiased) of a 2-D float image."""
    h, w = img.shape
    return _half_matrix(h) @ img @ _half_matrix(w).T


def image_blocks(luma: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(blocks, 36) NIQE features of every whole 96x96 block of a luma image (0..255)."""
    h, w = luma.shape
    nh, nw = h // BLOCK, w // BLOCK
    if not nh or not nw:
        raise ValueError(f"NIQE needs an image of at least {BLOCK}x{BLOCK}, got {w}x{h}")
    img = luma[: nh * BLOCK, : nw * BLOCK]
    per_scale = []
    for scale in (1, 2):
        coeffs = mscn(img, window)
        size = BLOCK // scale
        per_scale.append(
            [
                block_features(coeffs[i * size : (i + 1) * size, j * size : (j + 1) * size])
                for i in range(nh)
                for j in range(nw)
            ]
        )
        if scale == 1:
            img = half_scale(img / 255.0) * 255.0
    return np.concatenate([np.array(per_scale[0]), np.array(per_scale[1])], axis=1)


def score(features: np.ndarray, params: Mapping[str, np.ndarray]) -> float:
    """Distance between the pristine Gaussian and one fitted to `features` (n, 36); NaN if n < 2."""
    feats = np.asarray(features, dtype=np.float64).reshape(-1, FEATURES)
    feats = feats[~np.isnan(feats).any(axis=1)]
    if len(feats) < 2:
        return math.nan
    mu_p = np.asarray(params["mu_pris_param"]).ravel()
    cov_p = np.asarray(params["cov_pris_param"])
    diff = mu_p - feats.mean(axis=0)
    cov = np.cov(feats, rowvar=False)
    return float(np.sqrt(diff @ np.linalg.pinv((cov_p + cov) / 2) @ diff))


def niqe(image: torch.Tensor, params: Mapping[str, np.ndarray]) -> float:
    """NIQE of one (3, H, W) image in [0, 1] with >= 2 whole 96x96 blocks (NaN with one)."""
    return score(image_blocks(matlab_luma(image), params["gaussian_window"]), params)


def face_block(image: torch.Tensor, window: np.ndarray) -> np.ndarray:
    """(1, 36): a small image taken as ONE 96x96 block (bicubic up or down to 96 first)."""
    up = image.detach().double().clamp(0, 1)[None]
    if up.shape[-1] != BLOCK or up.shape[-2] != BLOCK:
        up = F.interpolate(up, size=(BLOCK, BLOCK), mode="bicubic", align_corners=False)
    return image_blocks(matlab_luma(up[0].clamp(0, 1)), window)


def features(image: torch.Tensor, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """The blocks an image contributes to a set score: its own 96x96 blocks, or one if smaller."""
    window = params["gaussian_window"]
    h, w = image.shape[-2:]
    if h >= BLOCK and w >= BLOCK:
        return image_blocks(matlab_luma(image), window)
    return face_block(image, window)


def load_params(path: str) -> dict[str, np.ndarray]:
    """The pristine model: `mu_pris_param` (1, 36), `cov_pris_param` (36, 36), the 7x7 window."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


__all__ = [
    "BLOCK",
    "aggd_params",
    "block_features",
    "face_block",
    "features",
    "half_scale",
    "image_blocks",
    "load_params",
    "matlab_luma",
    "mscn",
    "niqe",
    "score",
]
