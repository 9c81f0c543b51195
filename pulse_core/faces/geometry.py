"""Plane geometry shared by alignment and paste-back: 3x3 transforms and PIL warps.

A transform is a (3, 3) float64 matrix acting on homogeneous column vectors (x, y, 1) in
continuous pixel coordinates (`pulse_core/faces/photo.py`). Alignment transforms are
similarities, but everything here accepts a general projective matrix so that paste-back
never has to know which recipe made a face.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pulse_core.errors import ConfigError


def apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a (3, 3) transform (with the projective divide)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    h = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ np.asarray(transform).T
    return h[:, :2] / h[:, 2:3]


def from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The projective transform taking 4 source points exactly onto 4 destination points."""
    src = np.asarray(src, dtype=np.float64).reshape(4, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(4, 2)
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    try:
        coeffs = np.linalg.solve(np.array(rows), np.array(rhs))
    except np.linalg.LinAlgError:
        raise ConfigError(f"degenerate quadrilateral {src.tolist()}: no transform") from None
    return np.append(coeffs, 1.0).reshape(3, 3)


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst (Umeyama 1991).

    Reflections are excluded: a mirrored fit would swap a face's left and right.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 0:
        raise ConfigError("similarity fit needs at least two distinct points")
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = float((sigma * np.diag(sign)).sum() / var_s)
    m = np.eye(3)
    m[:2, :2] = scale * rotation
    m[:2, 2] = mu_d - scale * rotation @ mu_s
    return m


def scale_of(transform: np.ndarray) -> float:
    """Mean linear scale of the transform's linear part (sqrt |det|): output px per input px."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(transform)[:2, :2]))))


def scaling(sx: float, sy: float | None = None) -> np.ndarray:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def translation(tx: float, ty: float) -> np.ndarray:
    m = np.eye(3)
    m[:2, 2] = (tx, ty)
    return m


def warp(
    image: Image.Image,
    size: tuple[int, int],
    out_to_in: np.ndarray,
    resample: Image.Resampling,
) -> Image.Image:
    """PIL warp to an image of `size` (w, h), sampling `image` at out_to_in(output coords).

    AFFINE when the matrix's last row is (0, 0, 1), PERSPECTIVE otherwise. Outside the source
    PIL writes 0, which is what the masks rely on.
    """
    m = np.asarray(out_to_in, dtype=np.float64)
    m = m / m[2, 2]
    if np.allclose(m[2, :2], 0.0, atol=1e-12):
        data = tuple(float(v) for v in m[:2].ravel())
        return image.transform(size, Image.Transform.AFFINE, data, resample=resample)
    data = tuple(float(v) for v in m.ravel()[:8])
    return image.transform(size, Image.Transform.PERSPECTIVE, data, resample=resample)
