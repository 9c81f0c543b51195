"""BRISQUE (Mittal, Moorthy and Bovik 2012): a second no-reference realism score, optional.

Lower = more natural (about 0-100). Computed by OpenCV contrib's `cv2.quality.QualityBRISQUE`
with the LIVE model files from Debian's `opencv-data` (`BRISQUE_ASSET`). OpenCV contrib is an
evaluation-only dependency (`pip install 'pulse-pipeline[eval]'`): without it, or without the
model files, BRISQUE is reported as missing with the reason, and the run goes on.
Its MSCN statistics need no minimum size, so a 64x64 face is scored as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pulse_core.evaluation.assets import BRISQUE_ASSET, cached_folder

INSTALL_HINT = "pip install 'pulse-pipeline[eval]' (opencv-contrib-python-headless)"


class Brisque:
    """One loaded BRISQUE model; call it on (3, H, W) images in [0, 1]."""

    def __init__(self, model: Path, ranges: Path) -> None:
        import cv2

        self._q = cv2.quality.QualityBRISQUE_create(str(model), str(ranges))

    def __call__(self, image: torch.Tensor) -> float:
        rgb = (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return float(self._q.compute(np.ascontiguousarray(rgb[:, :, ::-1]))[0])  # BGR


def load_brisque(cache: Path | None = None) -> tuple[Brisque | None, str | None]:
    """(scorer, None), or (None, why it is missing and how to get it)."""
    try:
        import cv2
    except ImportError:
        return None, f"OpenCV is not installed: {INSTALL_HINT}"
    if not hasattr(cv2, "quality"):
        return None, f"OpenCV without its contrib modules (cv2.quality): {INSTALL_HINT}"
    folder = cached_folder(BRISQUE_ASSET, cache)
    if folder is None:
        return None, "BRISQUE model files not cached: `pulse models pull brisque`"
    names = [m.filename for m in BRISQUE_ASSET.members]
    return Brisque(folder / names[0], folder / names[1]), None


__all__ = ["INSTALL_HINT", "Brisque", "load_brisque"]
