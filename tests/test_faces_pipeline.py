"""Whole photos in, restored photos out: the faces stage through the one pipeline (issue 10).

`pulse upsample PHOTO --faces paste` and `pulse run` (the flow) on the public-domain photos of
tests/data/faces and a group photo composed at test time: every face is found, searched with
every other face of the batch, written in its own folder, recorded as one manifest row per
(face, sample) with its box and landmarks in photo coordinates, and pasted into the upscaled
photo; a photo without faces is done, not failed. Searches are tiny (the reference preset,
3 steps, 1 sample): these specs are about the stage, not the search. Tests that detect faces
need the MTCNN weights (`pulse models pull mtcnn`) and the demo model, and skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from bench.discovery_scale import baseline_discover
from pulse_cli.main import main
from pulse_core.errors import ConfigError
from pulse_core.faces import mtcnn
from pulse_core.faces.mtcnn import FacesUnavailable, weights_available
from pulse_core.faces.paste import upscale_photo
from pulse_core.manifest import RowContext, append_to_index, no_faces_rows, samples_table
from pulse_core.pipeline import discover, process_batch
from pulse_core.render import remove_stale_outputs, sample_keys
from pulse_core.settings import RestoreSettings, build_settings
from pulse_core.storage import LocalStorage, open_storage
from tests.test_discovery_scale import T0, Writer, touch
from tests.test_faces import DATA, GROUP_WIDTHS, HEADS, compose_group

needs_weights = pytest.mark.skipif(
    not weights_available(),
    reason="needs the MTCNN weights: run `pulse models pull mtcnn` (or `make model`)",
)
TINY = ["--samples", "1", "--steps", "3", "--preset", "reference", "--quiet"]
PORTRAITS = ("astronaut.jpg", "grace_hopper.jpg", "obama.jpg", "biden.jpg")
GROUP_CANVAS = (600, 200)  # four heads 25-31 px wide: the detector's small-face regime


def group_photo() -> tuple[Image.Image, list[tuple[float, float, float, float]]]:
    return compose_group(GROUP_WIDTHS[:4], GROUP_CANVAS, cols=4)


def run_manifest(dest: Path) -> pa.Table:
    (path,) = (dest / "_runs").glob("*/samples.parquet")
    return pq.read_table(path)


def rows_of(table: pa.Table, key: str) -> list[dict[str, Any]]:
    return [r for r in table.to_pylist() if r["input_key"] == key]


def centre_in(box: dict[str, float], expected: tuple[float, ...], margin: float = 5.0) -> bool:
    cx, cy = (box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2
    x0, y0, x1, y1 = expected
    return x0 - margin <= cx <= x1 + margin and y0 - margin <= cy <= y1 + margin


def far_from_faces(
    size: tuple[int, int], boxes: list[dict[str, float]], upscale: int
) -> np.ndarray:
    """Mask of output pixels well away from every face's aligned frame.

    The demo's frame spans about 1.45 face-box widths around the face (rotated: 2.1), so
    2.5 box sides around each box centre hold every pixel a paste may touch.
    """
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    far = np.ones((h, w), dtype=bool)
    for b in boxes:
        side = max(b["x1"] - b["x0"], b["y1"] - b["y0"]) * upscale
        cx, cy = (b["x0"] + b["x1"]) / 2 * upscale, (b["y0"] + b["y1"]) / 2 * upscale
        far &= (np.abs(xs - cx) > 1.25 * side) | (np.abs(ys - cy) > 1.25 * side)
    return far


# --------------------------------------------------------------------------------------------
# One `pulse upsample --faces paste` over every photo, shared by the specs below


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The portraits, the rocket (no faces), a greyscale portrait and a composed group photo."""
    folder = tmp_path_factory.mktemp("photos")
    for name in (*PORTRAITS, "rocket.jpg"):
        shutil.copy(DATA / name, folder / name)
    with Image.open(DATA / "grace_hopper.jpg") as im:
        ImageOps.grayscale(im).save(folder / "grey_hopper.png")
    group_photo()[0].save(folder / "group.png")
    return folder


@pytest.fixture(scope="module")
def upsampled(demo_generator, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not weights_available():
        pytest.skip("needs the MTCNN weights: run `pulse models pull mtcnn` (or `make model`)")
    out = tmp_path_factory.mktemp("upsampled") / "out"
    code = main(["upsample", str(photos), "--out", str(out), "--faces", "paste", *TINY])
    summary = json.loads((out / "summary.json").read_text())
    return {"code": code, "out": out, "summary": summary, "manifest": run_manifest(out)}


@needs_weights
def test_every_face_is_restored_in_its_own_folder(upsampled: dict) -> None:
    out = upsampled["out"]
    for name in (*PORTRAITS, "grey_hopper.png"):
        stem = name.rsplit(".", 1)[0]
        assert sorted(p.name for p in (out / stem).iterdir()) == ["face-0", "restored.png"]
        assert sorted(p.name for p in (out / stem / "face-0").iterdir()) == [
            "sample-0-lr.png",
            "sample-0.png",
            "sheet.png",
        ]
    assert sorted(p.name for p in (out / "group").iterdir() if p.is_dir()) == [
        f"face-{i}" for i in range(4)
    ]
    with Image.open(out / "astronaut" / "face-0" / "sample-0.png") as im:
        assert im.size == (64, 64)  # the demo generator's frame
        assert im.text["pulse:input"] == "astronaut.jpg" and im.text["pulse:face"] == "0"


@needs_weights
def test_one_row_per_face_and_sample_with_box_and_landmarks_in_photo_coordinates(
    upsampled: dict,
) -> None:
    table = upsampled["manifest"]
    for name in PORTRAITS:
        (row,) = rows_of(table, name)  # one face, one sample, reference preset: one row
        assert (row["status"], row["face_index"], row["sample_index"]) == ("ok", 0, 0)
        box = row["face_box"]
        np.testing.assert_allclose(
            [box["x0"], box["y0"], box["x1"], box["y1"]], HEADS[name], atol=3
        )
        points = np.array(row["face_landmarks"]).reshape(5, 2)
        assert ((points >= [box["x0"], box["y0"]]) & (points <= [box["x1"], box["y1"]])).all()
        assert row["face_recipe"] == "digiface"  # auto, for the demo's DCGAN family
        assert row["output_key"] == f"{name.rsplit('.', 1)[0]}/face-0/sample-0.png"
        assert row["lr_width"] * row["factor"] == 64 and row["fit_policy"] == "align"
    group = rows_of(table, "group.png")
    assert sorted(r["face_index"] for r in group) == [0, 1, 2, 3]
    expected = group_photo()[1]
    for row in group:
        assert any(centre_in(row["face_box"], e) for e in expected), row["face_box"]
        width = row["face_box"]["x1"] - row["face_box"]["x0"]
        assert row["lr_width"] <= 1.6 * width  # never more LR pixels than the photo has


@needs_weights
def test_restored_photo_is_the_upscaled_photo_with_faces_pasted(
    upsampled: dict, photos: Path
) -> None:
    out, table = upsampled["out"], upsampled["manifest"]
    for name in (*PORTRAITS, "group.png", "grey_hopper.png"):
        stem = name.rsplit(".", 1)[0]
        with Image.open(photos / name) as src, Image.open(out / stem / "restored.png") as got:
            assert got.size == (2 * src.width, 2 * src.height)
            plain = np.array(upscale_photo(src.convert("RGB"), 2))
            pasted = np.array(got.convert("RGB"))
        far = far_from_faces(got.size, [r["face_box"] for r in rows_of(table, name)], 2)
        assert far.mean() > 0.1, name
        assert np.array_equal(pasted[far], plain[far]), name
        assert not np.array_equal(pasted, plain), name  # and something was pasted
        assert {r["photo_output_key"] for r in rows_of(table, name)} == {f"{stem}/restored.png"}


@needs_weights
def test_a_photo_without_faces_is_done_with_its_reason_and_the_run_exits_0(
    upsampled: dict, photos: Path
) -> None:
    assert upsampled["code"] == 0
    (row,) = rows_of(upsampled["manifest"], "rocket.jpg")
    assert row["status"] == "no-faces" and "no face found" in row["error"]
    assert row["face_index"] is None and row["output_key"] is None
    summary = upsampled["summary"]
    assert (summary["ok"], summary["failed"], summary["no_faces"]) == (6, 0, 1)
    assert summary["faces_restored"] == 9  # 4 portraits, the grey one, 4 in the group
    (rocket,) = [i for i in summary["inputs"] if i["input_key"] == "rocket.jpg"]
    assert rocket["status"] == "no-faces" and rocket["faces"] == 0
    with (
        Image.open(photos / "rocket.jpg") as src,
        Image.open(upsampled["out"] / "rocket" / "restored.png") as got,
    ):
        assert np.array_equal(np.array(got), np.array(upscale_photo(src, 2)))


@needs_weights
def test_a_greyscale_photo_gets_greyscale_faces(upsampled: dict) -> None:
    (row,) = rows_of(upsampled["manifest"], "grey_hopper.png")
    assert row["status"] == "ok" and "greyscale -> RGB" in " ".join(row["conversions"])
    with Image.open(upsampled["out"] / "grey_hopper" / "restored.png") as im:
        rgb = np.array(im.convert("RGB"))
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


@needs_weights
def test_done_photos_are_skipped_and_discovery_agrees_with_the_baseline(
    upsampled: dict, photos: Path
) -> None:
    source, dest = open_storage(str(photos)), open_storage(str(upsampled["out"]))
    found = discover(source, dest, 1)
    assert (found.total, found.done, list(found.pending)) == (7, 7, [])
    for samples in (1, 2):
        expected = baseline_discover(source, dest, samples)
        got = discover(source, dest, samples)
        assert (list(got.pending), got.done) == (expected.pending, expected.done)
    assert list(discover(source, dest, 2).pending) == sorted(
        k for k in (*PORTRAITS, "grey_hopper.png", "group.png")
    )  # more samples wanted: every photo with faces is redone; the rocket stays done


# --------------------------------------------------------------------------------------------
# The flow: `pulse run --faces paste` restores, and a second run skips what is done


@needs_weights
@pytest.mark.integration
@pytest.mark.usefixtures("prefect_harness")
def test_pulse_run_restores_photos_and_a_rerun_skips_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    for name in ("astronaut.jpg", "rocket.jpg"):
        shutil.copy(DATA / name, source / name)
    argv = [
        "run",
        str(source),
        str(dest),
        "--faces",
        "paste",
        "--upscale",
        "3",
        "--json",
        *TINY[:-1],
    ]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["found"], first["ok"], first["no_faces"], first["failed"]) == (2, 1, 1, 0)
    assert (dest / "astronaut" / "face-0" / "sample-0.png").is_file()
    with Image.open(dest / "astronaut" / "restored.png") as im:
        assert im.size == (3 * 512, 3 * 512)
    table = run_manifest(dest)
    assert sorted(
        zip(table["input_key"].to_pylist(), table["status"].to_pylist(), strict=True)
    ) == [
        ("astronaut.jpg", "ok"),
        ("rocket.jpg", "no-faces"),
    ]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["found"], again["skipped"], again["attempted"]) == (2, 2, 0)


# --------------------------------------------------------------------------------------------
# Settings, stale outputs, missing weights, discovery rules (no search)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("faces", "crop", "unknown faces mode"),
        ("face_recipe", "celeba", "unknown face recipe"),
        ("upscale", 0, "upscale must be between 1 and 16"),
        ("upscale", 2.5, "upscale must be an integer"),
        ("min_face_size", 0.0, "min_face_size must be > 0"),
        ("min_face_size", float("nan"), "min_face_size must be > 0"),
    ],
)
def test_face_settings_are_checked_when_built(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RestoreSettings(**{field: value})


def test_auto_recipe_is_digiface_for_the_demo_family_and_ffhq_for_stylegans() -> None:
    auto = RestoreSettings(faces="align")
    assert auto.recipe_for("dcgan") == "digiface"
    assert auto.recipe_for("stylegan2") == auto.recipe_for("stylegan1") == "ffhq"
    assert RestoreSettings(face_recipe="ffhq").recipe_for("dcgan") == "ffhq"


def test_a_redo_removes_faces_and_samples_the_new_run_did_not_write(tmp_path: Path) -> None:
    dest = LocalStorage(tmp_path)
    old = [
        "p/sample-0.png",  # a whole-input restoration of p.jpg before the faces stage
        "p/sheet.png",
        "p/face-0/sample-0.png",
        "p/face-0/sample-1.png",  # more samples than the redo
        "p/face-1/sample-0.png",  # a face the redo no longer finds
        "p/face-1/sheet.png",
        "p/restored.png",
    ]
    kept_apart = ["p/face-1/notes.txt.png", "p/x/sample-0.png", "p/face-1/deeper/sample-0.png"]
    for key in (*old, *kept_apart):
        dest.write_bytes(key, b"png")
    keep = {"p/face-0/sample-0.png", "p/restored.png"}
    removed = remove_stale_outputs(dest, "p.jpg", keep=keep)
    assert sorted(removed) == sorted(set(old) - keep)
    left = sorted(o.key for o in dest.list())
    assert left == sorted([*keep, *kept_apart])


def test_without_weights_a_faces_batch_fails_at_once_naming_the_pull_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import tiny_dcgan

    (tmp_path / "src").mkdir()
    shutil.copy(DATA / "astronaut.jpg", tmp_path / "src" / "astronaut.jpg")
    real = importlib.util.find_spec
    monkeypatch.setenv("PULSE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "facenet_pytorch" else real(n, *a)
    )
    mtcnn._cached.cache_clear()  # a detector built by an earlier test would hide the check
    try:
        with pytest.raises(FacesUnavailable, match="pulse models pull mtcnn"):
            process_batch(
                ["astronaut.jpg"],
                LocalStorage(tmp_path / "src"),
                LocalStorage(tmp_path / "dest"),
                build_settings("reference", {"steps": 1}, samples=1, faces="paste"),
                run_id="run-1",
                batch_id="00000",
                generator=tiny_dcgan(),
            )
    finally:
        mtcnn._cached.cache_clear()
    assert not (tmp_path / "dest" / "_runs").exists()  # nothing recorded as a photo's failure


def test_models_info_describes_the_mtcnn_asset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "info", "mtcnn", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["package"] == "facenet-pytorch==2.6.0"
    assert info["files"] == ["pnet.pt", "rnet.pt", "onet.pt"]


def face_rows(dest: Path, key: str, faces: int, samples: int) -> list[dict]:
    """Index rows of a photo restored by the faces stage, with their PNGs in dest."""
    rows = []
    for f in range(faces):
        for row in Writer("run-1", T0).rows(dest, key, samples, png=False):
            out = sample_keys(key, row["sample_index"], f)[0]
            touch(dest, out)
            rows.append({**row, "face_index": f, "output_key": out})
    return rows


def test_discovery_of_photos_follows_each_face_and_the_no_faces_status(tmp_path: Path) -> None:
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    names = ["all.jpg", "missing.jpg", "none.jpg", "two.jpg", "whole.png", "new.jpg"]
    for name in names:
        (source / name).write_bytes(b"x")
    rows = face_rows(dest, "all.jpg", 3, 2)
    rows += face_rows(dest, "missing.jpg", 2, 2)
    (dest / "missing" / "face-1" / "sample-1.png").unlink()  # one face lacks one sample
    rows += face_rows(dest, "two.jpg", 2, 1)  # restored with fewer samples than asked
    rows += Writer("run-1", T0).rows(dest, "whole.png", 1)  # restored whole, one sample
    ctx = RowContext("run-1", "tiny", "c" * 64, 0.01, "cpu", T0)
    rows += no_faces_rows(ctx, "none.jpg", "no face found", "ab" * 32)
    append_to_index(LocalStorage(dest), samples_table(rows), "run-1-00000", reconcile=False)
    src, dst = open_storage(str(source)), open_storage(str(dest))
    found = discover(src, dst, 2)
    assert list(found.pending) == ["missing.jpg", "new.jpg", "two.jpg", "whole.png"]
    assert list(discover(src, dst, 1).pending) == ["new.jpg"]
    for samples in (1, 2, 3):
        expected = baseline_discover(src, dst, samples)
        got = discover(src, dst, samples)
        assert (list(got.pending), got.done) == (expected.pending, expected.done), samples


def test_face_outputs_in_a_dest_equal_to_source_are_not_inputs(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    for name in ("p.jpg", "q.jpg"):
        (root / name).write_bytes(b"x")
    rows = face_rows(root, "p.jpg", 2, 1)
    touch(root, "p/restored.png", "p/face-0/sheet.png")
    touch(root, "r/face-0/sample-0.png")  # no input r.*: an input itself
    append_to_index(LocalStorage(root), samples_table(rows), "run-1-00000")
    store = open_storage(str(root))
    found = discover(store, store, 1)
    assert list(found.pending) == ["q.jpg", "r/face-0/sample-0.png"]
    expected = baseline_discover(store, store, 1)
    assert (list(found.pending), found.total, found.done) == (
        expected.pending,
        expected.total,
        expected.done,
    )
