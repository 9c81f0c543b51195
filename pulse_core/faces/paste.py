"""Paste restored faces back into the (upscaled) photo.

The photo is enlarged by an integer `upscale` with Lanczos (PIL), the background's only
processing. Each restored face, an R x R image in its aligned frame, is warped back with the
inverse of its alignment transform (scaled by `upscale`) using PIL bicubic interpolation and
blended through a mask built in the aligned frame and warped the same way (bilinear), so mask
and face can never disagree about where the face is.

Mask: a soft-edged square covering the whole aligned frame. Alpha is 0 on the frame's
outermost pixel ring and rises with a smoothstep over `feather` x R pixels (default 0.1: 6 px
at R = 64, 102 px at R = 1024), so the seam falls in the frame's margin (FFHQ frames: hair and
background; the demo's tighter frame: forehead, cheeks and chin) and no hard edge is visible.
A square rather than an ellipse keeps all of the frame the generator drew; the feather hides
the seam either way. Where alpha is 0 the output is the Lanczos upscale, bit for bit.

Faces overlapping each other are composited in list order (later over earlier). A restored
face much larger than its place in the output is first reduced with Lanczos to about twice that
size, so the bicubic warp does not alias. On a greyscale photo (all three channels equal) each
face is pasted as its luminance (ITU-R 601-2, PIL's "L"), so a colour generator does not put
colour faces into a black-and-white photo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pulse_core.errors import ConfigError
from pulse_core.faces import geometry
from pulse_core.faces.align import AlignedFace
from pulse_core.faces.photo import Photo, as_rgb_array

DEFAULT_UPSCALE = 2
DEFAULT_FEATHER = 0.1  # soft edge width, as a fraction of the aligned frame side R


@dataclass(frozen=True, eq=False)
class PastedPhoto:
    """The upscaled photo with faces pasted, and where they went."""

    image: Image.Image  # RGB, (W * upscale, H * upscale)
    alpha: np.ndarray  # (H * upscale, W * upscale) float32 in [0, 1]: max of the face masks
    upscale: int  # the integer enlargement of the photo


def frame_mask(resolution: int, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """(R, R) float32 alpha in the aligned frame: 0 on the outer pixel ring, 1 inside the feather."""
    if not 0 < feather <= 0.5:
        raise ConfigError(f"feather must be in (0, 0.5] of the frame side, got {feather!r}")
    centres = np.arange(resolution, dtype=np.float64) + 0.5
    edge = np.minimum(centres, resolution - centres) - 1.0  # 0 at the outermost pixel centres
    t = np.clip(edge / (feather * resolution), 0.0, 1.0)
    ramp = t * t * (3.0 - 2.0 * t)  # smoothstep
    return np.minimum(ramp[:, None], ramp[None, :]).astype(np.float32)


def upscale_photo(photo: Photo, upscale: int = DEFAULT_UPSCALE) -> Image.Image:
    """The background: the photo enlarged by `upscale` with Lanczos (RGB)."""
    _check_upscale(upscale)
    image = Image.fromarray(as_rgb_array(photo))
    if upscale == 1:
        return image
    return image.resize((image.width * upscale, image.height * upscale), Image.Resampling.LANCZOS)


def paste_faces(
    photo: Photo,
    faces: Sequence[AlignedFace],
    restored: Sequence[torch.Tensor],
    *,
    upscale: int = DEFAULT_UPSCALE,
    feather: float = DEFAULT_FEATHER,
) -> PastedPhoto:
    """The photo upscaled, each `restored[i]` (3, R, R) in [0, 1] pasted where `faces[i]` was."""
    if len(faces) != len(restored):
        raise ConfigError(f"{len(faces)} faces but {len(restored)} restored images")
    rgb = as_rgb_array(photo)
    grey = bool(
        np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    )
    out = np.array(upscale_photo(rgb, upscale))
    alpha_all = np.zeros(out.shape[:2], dtype=np.float32)
    for face, image in zip(faces, restored, strict=True):
        _paste_one(out, alpha_all, face, image, upscale, feather, grey)
    return PastedPhoto(image=Image.fromarray(out), alpha=alpha_all, upscale=upscale)


def _paste_one(
    out: np.ndarray,
    alpha_all: np.ndarray,
    face: AlignedFace,
    restored: torch.Tensor,
    upscale: int,
    feather: float,
    grey: bool,
) -> None:
    """Warp one face and its mask into `out` in place, over the face's bounding box only."""
    r = face.resolution
    if not isinstance(restored, torch.Tensor) or tuple(restored.shape) != (3, r, r):
        shape = tuple(restored.shape) if isinstance(restored, torch.Tensor) else type(restored)
        raise ConfigError(f"face {face.index}: restored image must be (3, {r}, {r}), got {shape}")
    # aligned frame -> output px, and the output box the frame covers
    frame_to_out = geometry.scaling(upscale) @ face.inverse
    corners = geometry.apply(frame_to_out, np.array([[0, 0], [0, r], [r, r], [r, 0]], float))
    h, w = out.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int), (w, h))
    if x1 <= x0 or y1 <= y0:
        return  # wholly outside the photo
    # Reduce a face that would shrink a lot, so the bicubic warp does not alias.
    side_out = r * geometry.scale_of(frame_to_out)
    side = r if r <= 2 * side_out else max(2, math.ceil(2 * side_out))
    face_img = _to_pil(restored, grey)
    mask_img = Image.fromarray(frame_mask(r, feather))
    if side != r:
        face_img = face_img.resize((side, side), Image.Resampling.LANCZOS)
        mask_img = Image.fromarray(frame_mask(side, feather))
    out_to_src = (
        geometry.scaling(side / r) @ np.linalg.inv(frame_to_out) @ geometry.translation(x0, y0)
    )
    size = (int(x1 - x0), int(y1 - y0))
    warped = geometry.warp(face_img, size, out_to_src, Image.Resampling.BICUBIC)
    alpha = np.array(geometry.warp(mask_img, size, out_to_src, Image.Resampling.BILINEAR))
    alpha = np.clip(alpha, 0.0, 1.0)[:, :, None]
    region = out[y0:y1, x0:x1]
    blended = region.astype(np.float32) * (1.0 - alpha) + np.array(warped, np.float32) * alpha
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out[y0:y1, x0:x1] = np.where(alpha > 0, blended, region)
    np.maximum(alpha_all[y0:y1, x0:x1], alpha[:, :, 0], out=alpha_all[y0:y1, x0:x1])


def _to_pil(tensor: torch.Tensor, grey: bool) -> Image.Image:
    x = torch.nan_to_num(tensor.detach().to("cpu", torch.float32), nan=0.0).clamp(0.0, 1.0)
    a = (x * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(a)
    return image.convert("L").convert("RGB") if grey else image


def _check_upscale(upscale: int) -> None:
    if not isinstance(upscale, int) or isinstance(upscale, bool) or upscale < 1:
        raise ConfigError(f"upscale must be a positive integer, got {upscale!r}")
