"""Align detected faces to a generator's frame, and make each face's LR input.

Two recipes map a face's 5 landmarks to the generator's R x R frame (the HR frame):

- `ffhq`, for StyleGAN-family models trained on FFHQ (Karras et al. 2019, the dataset's
  `recreate_aligned_images` recipe, re-implemented from its description): an oriented square
  (quad) from the eye centres and the mouth corners,
      eye_to_eye = right eye - left eye,  eye_to_mouth = mouth centre - eye centre,
      x = eye_to_eye - rot90(eye_to_mouth), normalised, times
          max(2.0 * |eye_to_eye|, 1.8 * |eye_to_mouth|);  y = rot90(x),
      c = eye centre + 0.1 * eye_to_mouth,  quad = [c - x - y, c - x + y, c + x + y, c + x - y]
  (corners top-left, bottom-left, bottom-right, top-right), mapped onto the frame's corners.
  For a typical upright face (|eye_to_mouth| ~ |eye_to_eye|), the eyes land at x = 3/8 R and
  5/8 R, just above the middle: y = R/2 - 0.1 * |eye_to_mouth| / (4 |eye_to_eye|) * R.
  FFHQ's eyes were dlib's 6-point eye-contour means; MTCNN's are pupil centres: the same point
  to within a pixel or two at FFHQ scale.
- `digiface`, for the demo DCGAN (64 px, trained on synthetic DigiFace-1M faces): the
  least-squares similarity onto the 5-point template of 112 x 112 ArcFace crops (the alignment
  DigiFace-1M ships), scaled to R. Why this one: MTCNN on 200 demo samples (upsampled 4x; 188
  detected) puts the mean landmarks at eyes (22.6, 29.7) (42.1, 29.4), nose (32.1, 42.2),
  mouth (24.0, 52.7) (40.6, 52.5) in the 64 px frame; the template scaled to 64 is (21.9,
  29.5) (42.0, 29.4) (32.0, 41.0) (23.7, 52.8) (40.4, 52.7): within 0.7 px except the nose
  (1.2 px, the noisiest point: std 3.5 px). It is much tighter than FFHQ's: the eyes are 0.31 R
  apart (FFHQ: 0.25 R) and the mouth sits at 0.82 R, so the frame holds brows to chin with
  little hair or background, as the generator's samples do.

Sampling (both recipes): the photo window around the quad is cut out; where it runs past the
photo's edge it is filled by reflection, blurred towards the edge (Gaussian, sigma = 2% of the
quad side) and faded towards the window's median colour, as FFHQ does, so a face at the border
gets a plausible surround instead of black. Faces much larger than the frame are first reduced
by an integer box filter, then warped with bicubic interpolation at up to 4x the frame size
and reduced with Lanczos: every output pixel averages the photo pixels it covers (no
aliasing); faces smaller than the frame are simply interpolated.

LR input: the face's size in the photo is the quad side (photo px across the aligned frame).
The LR side is the largest allowed size (`pulse_core.imaging.allowed_lr_sizes(R)`) not above
it, and at least the smallest allowed size, so the LR never claims more detail than the
photo holds. It is made from the aligned HR crop with the search's own forward operator
(`pulse_core.downscale.downscale`), so DS(HR crop) == LR exactly: the search's target is
consistent with its DS, and the LR is what the photo shows at that scale (up to the
photo's own blur).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pulse_core.downscale import downscale
from pulse_core.errors import ConfigError
from pulse_core.faces import geometry
from pulse_core.faces.mtcnn import DetectedFace
from pulse_core.faces.photo import Photo, as_rgb_array
from pulse_core.imaging import allowed_lr_sizes, check_lr_size

Recipe = Literal["ffhq", "digiface"]
RECIPES: tuple[str, ...] = get_args(Recipe)

# The ArcFace / insightface 5-point template for 112 x 112 crops (x, y), the crop DigiFace-1M uses.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ]
)

MAX_SUPERSAMPLE = 4  # the warp is rendered at up to 4x the frame, then Lanczos-reduced (as FFHQ)
BORDER_FRACTION = 0.1  # photo window = quad bounding box + 10% of the quad side (FFHQ's border)
PAD_BLUR_FRACTION = 0.02  # sigma of the edge blur, as a fraction of the quad side (FFHQ's)


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """One face in the generator's frame, with what is needed to put it back."""

    index: int  # position of the face in the detection list
    detected: DetectedFace  # the detection it was made from
    quad: np.ndarray  # (4, 2) photo coords of the frame's corners: TL, BL, BR, TR
    transform: np.ndarray  # (3, 3) photo px -> aligned frame px (0..R); invert to paste back
    hr_crop: torch.Tensor  # (3, R, R) float32 in [0, 1]: the face in the HR frame
    lr: torch.Tensor  # (3, s, s) float32: downscale(hr_crop, factor, operator), not clamped
    lr_size: int  # s, an allowed LR size for R
    factor: int  # R // s
    recipe: str = "ffhq"  # the alignment recipe used
    operator: str = "bicubic"  # the forward operator the LR was made with

    @property
    def resolution(self) -> int:
        return int(self.hr_crop.shape[-1])

    @property
    def face_size(self) -> float:
        """The quad side in photo px: how many photo pixels span the aligned frame."""
        return self.resolution / geometry.scale_of(self.transform)

    @property
    def inverse(self) -> np.ndarray:
        """(3, 3) aligned frame px -> photo px."""
        return np.linalg.inv(self.transform)

    def aligned_landmarks(self) -> np.ndarray:
        """(5, 2) the detected landmarks in the aligned frame."""
        return geometry.apply(self.transform, self.detected.landmarks)


# ---------------------------------------------------------------------------------------------
# Recipes: landmarks -> quad (photo coords of the frame's corners)


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ oriented square for 5 landmarks (eyes, nose, mouth corners); see module doc."""
    lm = _check_landmarks(landmarks)
    eye_left, eye_right = lm[0], lm[1]
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[3] + lm[4]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    norm = np.hypot(*x)
    if norm == 0:
        raise ConfigError(f"degenerate landmarks {lm.tolist()}: no face orientation")
    x = x / norm * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def digiface_transform(landmarks: np.ndarray, resolution: int) -> np.ndarray:
    """Photo -> frame similarity fitting the landmarks to the ArcFace template scaled to R."""
    template = ARCFACE_TEMPLATE_112 * (resolution / 112.0)
    return geometry.similarity_fit(_check_landmarks(landmarks), template)


def frame_corners(resolution: int) -> np.ndarray:
    """The aligned frame's corners in quad order: TL, BL, BR, TR."""
    r = float(resolution)
    return np.array([[0.0, 0.0], [0.0, r], [r, r], [r, 0.0]])


def face_transform(landmarks: np.ndarray, resolution: int, recipe: Recipe) -> np.ndarray:
    """(3, 3) photo -> aligned frame for one face under a recipe."""
    if recipe == "ffhq":
        return geometry.from_points(ffhq_quad(landmarks), frame_corners(resolution))
    if recipe == "digiface":
        return digiface_transform(landmarks, resolution)
    raise ConfigError(f"unknown alignment recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")


def choose_lr_size(face_size: float, resolution: int) -> int:
    """Largest allowed LR side <= the face's size in the photo; at least the smallest allowed."""
    allowed = allowed_lr_sizes(resolution)
    fitting = [s for s in allowed if s <= face_size]
    return max(fitting) if fitting else min(allowed)


# ---------------------------------------------------------------------------------------------
# Alignment


def align_faces(
    photo: Photo,
    faces: Sequence[DetectedFace],
    resolution: int,
    *,
    recipe: Recipe = "ffhq",
    operator: str = "bicubic",
    lr_size: int | None = None,
) -> list[AlignedFace]:
    """Each detected face in the R x R frame, with its transform and its LR input.

    `lr_size` forces one LR side for every face (it must be allowed for R); by default each
    face gets `choose_lr_size(face_size, R)`.
    """
    allowed_lr_sizes(resolution)  # validates the resolution
    if lr_size is not None:
        check_lr_size(lr_size, resolution)
    rgb = as_rgb_array(photo)
    return [
        align_face(
            rgb, face, resolution, index=i, recipe=recipe, operator=operator, lr_size=lr_size
        )
        for i, face in enumerate(faces)
    ]


def align_face(
    photo: Photo,
    face: DetectedFace,
    resolution: int,
    *,
    index: int = 0,
    recipe: Recipe = "ffhq",
    operator: str = "bicubic",
    lr_size: int | None = None,
) -> AlignedFace:
    """One face: transform, HR crop, and its LR input made with the search's forward operator."""
    rgb = photo if isinstance(photo, np.ndarray) and photo.ndim == 3 else as_rgb_array(photo)
    transform = face_transform(face.landmarks, resolution, recipe)
    quad = geometry.apply(np.linalg.inv(transform), frame_corners(resolution))
    hr = torch.from_numpy(np.asarray(sample_frame(rgb, transform, resolution), dtype=np.float32))
    hr = hr.permute(2, 0, 1).contiguous() / 255.0
    face_size = resolution / geometry.scale_of(transform)
    size = choose_lr_size(face_size, resolution) if lr_size is None else lr_size
    factor = check_lr_size(size, resolution)
    lr = downscale(hr[None], factor, operator)[0]
    assert hr.shape == (3, resolution, resolution) and lr.shape == (3, size, size)
    return AlignedFace(
        index=index,
        detected=face,
        quad=quad,
        transform=transform,
        hr_crop=hr,
        lr=lr,
        lr_size=size,
        factor=factor,
        recipe=recipe,
        operator=operator,
    )


def sample_frame(rgb: np.ndarray, transform: np.ndarray, resolution: int) -> Image.Image:
    """The R x R aligned frame sampled from the photo (see the module doc for the steps)."""
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8, rgb.shape
    inverse = np.linalg.inv(transform)
    quad = geometry.apply(inverse, frame_corners(resolution))
    qsize = resolution / geometry.scale_of(transform)  # photo px across the frame
    border = max(round(qsize * BORDER_FRACTION), 3)
    x0, y0 = np.floor(quad.min(axis=0)).astype(int) - border
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int) + border
    # Reduce big faces by an integer box filter first, to 2-4x the frame (FFHQ's shrink).
    shrink = max(1, math.floor(qsize / resolution / 2))
    x1 += (-(x1 - x0)) % shrink  # window sides divisible by the shrink
    y1 += (-(y1 - y0)) % shrink
    window = Image.fromarray(_padded_window(rgb, (x0, y0, x1, y1), qsize))
    if shrink > 1:
        window = window.reduce(shrink)
    # output px (supersampled frame) -> window px
    supersample = min(MAX_SUPERSAMPLE, max(1, math.ceil(qsize / shrink / resolution)))
    out_to_in = (
        geometry.scaling(1.0 / shrink)
        @ geometry.translation(-x0, -y0)
        @ inverse
        @ geometry.scaling(1.0 / supersample)
    )
    big = resolution * supersample
    frame = geometry.warp(window, (big, big), out_to_in, Image.Resampling.BICUBIC)
    if supersample > 1:
        frame = frame.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return frame


def _padded_window(rgb: np.ndarray, box: tuple[int, int, int, int], qsize: float) -> np.ndarray:
    """Photo pixels in box (x0, y0, x1, y1); outside the photo: reflection, blurred and faded."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    pads = (max(-y0, 0), max(y1 - h, 0), max(-x0, 0), max(x1 - w, 0))  # top, bottom, left, right
    inner = rgb[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
    if inner.size == 0:
        raise ConfigError(f"face window {box} lies outside the {w}x{h} photo")
    if not any(pads):
        return np.ascontiguousarray(inner)
    top, bottom, left, right = pads
    mode = "reflect" if min(inner.shape[:2]) > 1 else "edge"
    img = np.pad(inner, ((top, bottom), (left, right), (0, 0)), mode=mode).astype(np.float32)
    # FFHQ's fade: 1 at the window's outer edge, 0 at the photo's edge, negative inside.
    hh, ww = img.shape[:2]
    ys = np.arange(hh, dtype=np.float32)[:, None]
    xs = np.arange(ww, dtype=np.float32)[None, :]
    ramps = [
        1.0 - ys / top if top else None,
        1.0 - (hh - 1 - ys) / bottom if bottom else None,
        1.0 - xs / left if left else None,
        1.0 - (ww - 1 - xs) / right if right else None,
    ]
    mask = np.full((hh, ww), -np.inf, dtype=np.float32)
    for ramp in ramps:
        if ramp is not None:
            mask = np.maximum(mask, np.broadcast_to(ramp, (hh, ww)))
    mask = mask[:, :, None]
    blurred = _gaussian_blur(img, max(qsize * PAD_BLUR_FRACTION, 0.5))
    img += (blurred - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    img += (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float32 array, reflect-padded (torch, no scipy)."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, min(img.shape[:2]) - 1) or 1
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    c = x.shape[1]
    mode = "reflect" if min(img.shape[:2]) > radius else "replicate"
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return x[0].permute(1, 2, 0).numpy()


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise ConfigError(f"expected 5 finite (x, y) landmarks, got shape {lm.shape}")
    return lm
