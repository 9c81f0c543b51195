"""Identity distance to the ground truth with dlib's face embedding: optional.

dlib's ResNet face descriptor (128-d, from `face-recognition-models`) separates people at a
Euclidean distance of 0.6 (same person below). A restoration that keeps the person should stay
below it; PULSE makes no such promise (it explains the LR image, not the identity), which is why
the number is worth showing. The aligned face fills the frame, so no detector runs: the 5-point
landmark model is fitted on the whole image, then the descriptor is computed.

Needs `dlib` (`dlib-bin` wheel) and `face_recognition_models` (`pip install
'pulse-pipeline[eval]'`); without them the metric is reported as missing with that hint.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = "pip install 'pulse-pipeline[eval]' (dlib-bin, face-recognition-models)"
SAME_PERSON = 0.6  # dlib's documented threshold
MIN_SIDE = 150  # dlib's descriptor network works on 150x150 chips: smaller faces are enlarged

Embedder = Callable[[torch.Tensor], np.ndarray]


def load_embedder() -> tuple[Embedder | None, str | None]:
    """(embed(image) -> (128,), None), or (None, why it is missing)."""
    try:
        import dlib
    except ImportError as exc:
        return None, f"{exc.name} is not installed: {INSTALL_HINT}"
    models = _models_folder()
    if models is None:
        return None, f"face_recognition_models is not installed: {INSTALL_HINT}"
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(image: torch.Tensor) -> np.ndarray:
        x = image.detach().clamp(0, 1)[None].float()
        side = max(MIN_SIDE, int(x.shape[-1]))
        if x.shape[-1] != side:
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bicubic")
        rgb = (x[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        rgb = np.ascontiguousarray(rgb)
        shape = predictor(rgb, dlib.rectangle(0, 0, side - 1, side - 1))
        return np.asarray(net.compute_face_descriptor(rgb, shape), dtype=np.float64)

    return embed, None


def _models_folder() -> Path | None:
    """face_recognition_models' `models/` folder, found without importing the package.

    Its `__init__` imports `pkg_resources`, which setuptools >= 81 no longer ships: importing it
    fails on a current environment although the model files are there.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(root) / "models"
        if (folder / "dlib_face_recognition_resnet_model_v1.dat").is_file():
            return folder
    return None


def identity_distance(embed: Embedder, a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.linalg.norm(embed(a) - embed(b)))


__all__ = ["INSTALL_HINT", "SAME_PERSON", "identity_distance", "load_embedder"]
