"""One way in for whole photos: anything the faces stage accepts becomes 8-bit RGB pixels.

Detection, alignment and paste-back all work on the same (H, W, 3) uint8 array so that the
coordinates one step reports are the coordinates the next step reads. PIL images go through
`pulse_core.imaging.image_from_pil`, the normaliser every other input uses (EXIF orientation,
alpha, palette, 16-bit, CMYK, grey -> RGB), so a photo is seen the same way here as by
`pulse upsample`. Greyscale is replicated into three channels.

Coordinates convention for the whole package: continuous photo pixel coordinates (x, y), where
the pixel in column i and row j covers [i, i + 1) x [j, j + 1) (its centre is (i + 0.5, j + 0.5)).
This is the convention of PIL's `Image.transform`, so transforms go to PIL without offsets.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pulse_core.errors import ConfigError
from pulse_core.imaging import image_from_pil

Photo = Image.Image | torch.Tensor | np.ndarray  # what the faces functions accept as a photo


def as_rgb_array(photo: Photo) -> np.ndarray:
    """The photo as a C-contiguous (H, W, 3) uint8 array (a new array; the input is not kept).

    Accepted: a PIL image of any mode; a float tensor (3, H, W), (1, H, W) or (H, W) in [0, 1]
    (as `LoadedImage.tensor`); a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha
    dropped).
    """
    if isinstance(photo, Image.Image):
        return as_rgb_array(image_from_pil(photo).tensor)
    if isinstance(photo, torch.Tensor):
        x = photo.detach().to("cpu", torch.float32)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ConfigError(
                f"a photo tensor must be (3, H, W), (1, H, W) or (H, W), got {tuple(photo.shape)}"
            )
        x = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        x = x.expand(3, -1, -1)
        return np.ascontiguousarray(x.permute(1, 2, 0).numpy())
    if isinstance(photo, np.ndarray):
        if photo.dtype != np.uint8:
            raise ConfigError(f"a photo array must be uint8, got {photo.dtype}")
        a = photo[:, :, None] if photo.ndim == 2 else photo
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ConfigError(
                f"a photo array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {photo.shape}"
            )
        a = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[:, :, :3]
        return np.ascontiguousarray(a)
    raise ConfigError(
        f"expected a photo as PIL.Image, torch.Tensor or numpy array, not {type(photo).__name__}"
    )
