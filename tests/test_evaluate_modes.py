"""Smoke tests of bench/evaluate_modes.py's metrics and aggregation (no network, no search).

BRISQUE needs the evaluation-only OpenCV contrib wheel (bench/requirements-eval.txt) and the
model files in the evaluation asset cache (or Debian's opencv-data): its test skips without them.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "evaluate_modes.py"
ASTRONAUT = REPO_ROOT / "examples" / "hr" / "astronaut-64.png"


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate_modes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_modes"] = module
    spec.loader.exec_module(module)
    return module


ev = _load_script()


def _load(path: Path) -> torch.Tensor:
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def _astronaut() -> torch.Tensor:
    return _load(ASTRONAUT)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    w = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
    for _ in range(3):
        x = F.conv2d(F.pad(x[None], (2, 2, 2, 2), mode="reflect"), w, groups=3)[0]
    return x


def _niqe_window() -> np.ndarray:
    """NIQE's 7x7 Gaussian window (sigma 7/6), as in its pristine-model file."""
    g = np.exp(-((np.arange(7) - 3) ** 2) / (2 * (7 / 6) ** 2))
    w = np.outer(g, g)
    return w / w.sum()


def test_aggd_fit_of_a_gaussian_has_shape_two_and_equal_scales() -> None:
    x = np.random.default_rng(0).standard_normal(200_000)
    alpha, left, right = ev.aggd_params(x)
    assert abs(alpha - 2.0) < 0.05
    # For alpha = 2 the AGGD scale is sigma * sqrt(2).
    assert left == pytest.approx(math.sqrt(2), rel=0.02)
    assert right == pytest.approx(math.sqrt(2), rel=0.02)


def test_aggd_fit_of_a_laplacian_has_shape_one() -> None:
    x = np.random.default_rng(1).laplace(size=200_000)
    assert abs(ev.aggd_params(x)[0] - 1.0) < 0.05


def test_niqe_features_are_finite_and_differ_after_blur() -> None:
    window = _niqe_window()
    sharp = ev.niqe_features(_astronaut(), window)
    blurred = ev.niqe_features(_blur(_astronaut()), window)
    assert sharp.shape == (36,) and np.isfinite(sharp).all()
    assert 0.2 <= sharp[0] <= 10 and sharp[1] > 0  # AGGD shape within its grid, a scale > 0
    assert not np.allclose(sharp, blurred)


def test_niqe_with_the_pristine_model_prefers_sharp_faces() -> None:
    params_file = ev.asset_dir(None) / "niqe_pris_params.npz"
    if not params_file.is_file():
        pytest.skip("NIQE model not cached: run bench/evaluate_modes.py --quick once")
    npz = np.load(params_file)
    params = {k: npz[k] for k in npz.files}
    faces = [_astronaut(), _load(REPO_ROOT / "examples" / "hr" / "grace-hopper-64.png")]
    faces += [f.flip(-1) for f in faces]
    window = params["gaussian_window"]
    sharp = ev.niqe_score(np.array([ev.niqe_features(f, window) for f in faces]), params)
    blurred = ev.niqe_score(np.array([ev.niqe_features(_blur(f), window) for f in faces]), params)
    assert 0 < sharp < blurred


def test_niqe_score_is_zero_for_the_pristine_mean_and_grows_with_distance() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 36))
    params = {"mu_pris_param": feats.mean(axis=0)[None], "cov_pris_param": np.eye(36)}
    assert ev.niqe_score(feats, params) == pytest.approx(0.0, abs=1e-9)
    assert ev.niqe_score(feats + 1.0, params) > ev.niqe_score(feats + 0.1, params) > 0
    assert math.isnan(ev.niqe_score(feats[:1], params))  # one block: no covariance


def test_psnr_and_ssim_of_an_image_with_itself_and_with_noise() -> None:
    x = _astronaut()
    assert ev.psnr(x, x) == math.inf
    assert ev.ssim(x, x) == pytest.approx(1.0)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert 15 < ev.psnr(x, noisy) < 25
    assert ev.ssim(x, noisy) < 0.9


def _record(inp: str, sample: int, converged: bool, mse: float, colour: bool = False) -> dict:
    return {
        "mode": "m",
        "size": 8,
        "input": inp,
        "colour": colour,
        "sample": sample,
        "converged": converged,
        "lr_mse": mse,
        "lr_psnr": 10 * math.log10(1 / mse),
        "brisque": 20.0 + sample,
        "input_steps": 300,
        "input_attempts": 3,
    }


def test_summarise_shares_means_and_medians() -> None:
    records = [
        _record("a", 0, True, 1e-3, colour=True),
        _record("a", 1, False, 3e-3, colour=True),
        _record("b", 0, False, 4e-3),
        _record("b", 1, False, 5e-3),
        _record("c", 0, True, 1e-3),
        _record("c", 1, True, 2e-3),
    ]
    s = ev.summarise(records)
    assert s["inputs"] == 3 and s["samples"] == 6
    assert s["inputs_converged"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["inputs_all_converged"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["samples_converged"] == pytest.approx(0.5)
    assert s["inputs_converged_colour"] == 1.0
    assert s["inputs_converged_lfw"] == 0.5
    assert s["lr_mse_mean"] == pytest.approx(16e-3 / 6, rel=1e-4)
    assert s["lr_mse_median"] == pytest.approx(2.5e-3)
    assert s["brisque_mean"] == pytest.approx(20.5)
    assert s["steps_per_input"] == 300
    assert s["restarts_per_input"] == 1
    table = ev.markdown_table({"m": s, "empty": {}})
    assert "| m | 67% | 50% | 100% |" in table
    assert table.splitlines()[-1].startswith("| empty | - |")


def test_eye_crop_box_is_square_with_the_eyes_at_the_set_height() -> None:
    left, top, right, bottom = ev.eye_crop_box((100, 200), (200, 200))
    assert right - left == bottom - top == 320
    assert (200 - top) / (bottom - top) == pytest.approx(ev.EYE_HEIGHT, abs=0.01)
    assert (left + right) / 2 == 150


def test_grid_sheet_has_one_cell_per_input_and_column() -> None:
    img = torch.rand(3, 64, 64)
    small = torch.rand(3, 8, 8)
    cols = [("truth", [(img, True)] * 3), ("input 8x8", [(small, True)] * 3)]
    cols.append(("mode", [(img, False)] * 3))
    sheet = ev.grid_sheet(cols, [0, 2], ["first", "third"])
    assert sheet.width > 3 * 64 and sheet.height > 2 * 64
    # A sample that did not converge gets a red frame.
    px = np.asarray(sheet)
    assert ((px[..., 0] > 200) & (px[..., 1] < 30)).any()


def _brisque_models() -> Path | None:
    for folder in (ev.asset_dir(None), Path("/usr/share/opencv4/quality")):
        if (folder / "brisque_model_live.yml").is_file():
            return folder
    return None


def test_brisque_scores_a_blurred_face_worse() -> None:
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "quality"):
        pytest.skip("OpenCV without contrib: pip install -r bench/requirements-eval.txt")
    folder = _brisque_models()
    if folder is None:
        pytest.skip("BRISQUE models not cached: run bench/evaluate_modes.py --quick once")
    score = ev.Brisque(folder / "brisque_model_live.yml", folder / "brisque_range_live.yml")
    sharp, blurred = score(_astronaut()), score(_blur(_astronaut()))
    assert 0 < sharp < blurred


def test_missing_opencv_contrib_stops_with_the_install_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(SystemExit, match=r"requirements-eval\.txt"):
        ev.require_brisque()


def test_modes_have_unique_names_and_quick_scaling_shortens_them() -> None:
    full, quick = ev.modes(), ev.modes(0.1)
    names = [m.name for m in full]
    assert len(names) == len(set(names))
    assert {"plain-100", "plain-300", "plain-es-restarts", "inter-16x16-r0.05"} <= set(names)
    by_name = {m.name: m for m in quick}
    assert by_name["plain-100"].config.steps == 10
    assert by_name["plain-es-restarts"].step_budget() == 3 * ev.SAMPLES * 10
    assert full[0].config == ev.SearchConfig.reference()
