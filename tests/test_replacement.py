"""Specification: an input is the unit of replacement (outputs and index rows, together).

A redo of an input (`pulse run --force`, or a resume after a failure) replaces all of that
input's PNGs and index rows with the new run's, never a mix; a redo that fails keeps the
earlier success. Runs the real pipeline (`process_batch` + `finalize_run`) with the demo
generator and two-step searches, on a local folder and on S3 (moto, and a real SeaweedFS server).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest

from pulse_core.manifest import (
    index_run_ids_without_manifest,
    read_index,
    read_manifest,
    run_manifest_key,
)
from pulse_core.pipeline import finalize_run, process_batch
from pulse_core.render import remove_stale_outputs, sample_keys, sheet_key
from pulse_core.search import SearchConfig
from pulse_core.settings import RestoreSettings
from pulse_core.storage import LocalStorage, S3Storage, Storage, StorageConfig, open_storage

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"
INPUTS = {"g.png": "grace-hopper-16.png", "a.png": "astronaut-16.png"}


def settings(samples: int, restart_budget: float = 1.0) -> RestoreSettings:
    """Two-step searches that never converge (eps ~ 0), so a budget > 1 adds extra restarts."""
    search = SearchConfig(steps=2, eps=1e-9, restart_budget=restart_budget)
    return RestoreSettings(samples=samples, preset="reference", search=search)


@pytest.fixture
def source(tmp_path: Path) -> LocalStorage:
    root = tmp_path / "source"
    root.mkdir()
    for key, name in INPUTS.items():
        shutil.copy(EXAMPLES / name, root / key)
    return LocalStorage(root)


@pytest.fixture(params=["local", "s3", "seaweedfs"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        storage = LocalStorage(tmp_path / "dest")
        storage.check(create=True)
        return storage
    if request.param == "seaweedfs":  # a real S3 server (tests/s3_server.py)
        server = request.getfixturevalue("seaweedfs")
        url = server.url(prefix=f"replacement-{uuid.uuid4().hex[:12]}")
        return open_storage(url, server.storage_config())
    endpoint = request.getfixturevalue("moto_endpoint")
    config = StorageConfig(
        endpoint_url=endpoint,
        region="us-east-1",
        access_key="testing",
        secret_key="testing-secret",
        max_attempts=1,
    )
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    S3Storage(bucket, "", config).client.create_bucket(Bucket=bucket)
    return S3Storage(bucket, "restored", config)


def folder(dest: Storage, base: str) -> set[str]:
    return {o.key for o in dest.list(prefix=f"{base}/")}


def index_rows(dest: Storage, input_key: str) -> list[tuple[str, int]]:
    index = read_index(dest, columns=["input_key", "run_id", "sample_index"])
    rows = index.filter(pc.equal(index.column("input_key"), input_key)).to_pylist()
    return [(r["run_id"], r["sample_index"]) for r in rows]


def manifest_rows(dest: Storage, run_id: str, input_key: str) -> list[tuple[str, int]]:
    table = read_manifest(dest, run_manifest_key(run_id, "samples"))
    rows = table.filter(pc.equal(table.column("input_key"), input_key)).to_pylist()
    return sorted((r["run_id"], r["sample_index"]) for r in rows)


def raw_index(dest: Storage) -> list[tuple[str, int, str]]:
    """Every row of the raw index folder, as a reader without our help sees it."""
    rows = []
    for info in dest.list(prefix="_manifest/samples/", suffixes=(".parquet",)):
        part = read_manifest(dest, info.key)
        rows += zip(
            part.column("input_key").to_pylist(),
            part.column("sample_index").to_pylist(),
            part.column("run_id").to_pylist(),
            strict=True,
        )
    return sorted(rows)


def test_a_forced_redo_with_fewer_samples_replaces_the_input_whole(
    demo_generator, source: LocalStorage, dest: Storage
) -> None:
    first = settings(samples=3, restart_budget=2.0)  # 3 selected + extra unselected restarts
    process_batch(
        ["a.png", "g.png"], source, dest, first, run_id="run-1", batch_id="0",
        generator=demo_generator,
    )  # fmt: skip
    finalize_run(dest, "run-1")
    assert len(index_rows(dest, "g.png")) > 3  # the unselected restarts are indexed too
    assert folder(dest, "g") == {
        *sample_keys("g.png", 0), *sample_keys("g.png", 1), *sample_keys("g.png", 2),
        sheet_key("g.png"),
    }  # fmt: skip
    a_before = {key: dest.read_bytes(key) for key in folder(dest, "a")}

    process_batch(
        ["g.png"], source, dest, settings(samples=1), run_id="run-2", batch_id="0",
        generator=demo_generator,
    )  # fmt: skip
    finalize_run(dest, "run-2")

    assert folder(dest, "g") == {*sample_keys("g.png", 0), sheet_key("g.png")}
    assert index_rows(dest, "g.png") == [("run-2", 0)]
    assert index_rows(dest, "g.png") == manifest_rows(dest, "run-2", "g.png")
    assert {run for run, _ in index_rows(dest, "a.png")} == {"run-1"}  # untouched input
    assert {key: dest.read_bytes(key) for key in folder(dest, "a")} == a_before
    expected_raw = sorted(
        (key, k, run) for key in ("a.png", "g.png") for run, k in index_rows(dest, key)
    )
    assert raw_index(dest) == expected_raw  # reconciled: the folder itself holds no stale rows
    assert index_run_ids_without_manifest(dest) == set()


def test_a_failed_redo_keeps_the_earlier_success(
    demo_generator, source: LocalStorage, dest: Storage
) -> None:
    process_batch(
        ["g.png"], source, dest, settings(samples=2), run_id="run-1", batch_id="0",
        generator=demo_generator,
    )  # fmt: skip
    finalize_run(dest, "run-1")
    before = {key: dest.read_bytes(key) for key in folder(dest, "g")}

    source.write_bytes("g.png", b"not an image any more")
    outcome = process_batch(
        ["g.png"], source, dest, settings(samples=1), run_id="run-2", batch_id="0",
        generator=demo_generator,
    )  # fmt: skip
    finalize_run(dest, "run-2")

    assert outcome.inputs[0].status == "failed"
    assert index_rows(dest, "g.png") == [("run-1", 0), ("run-1", 1)]
    assert {key: dest.read_bytes(key) for key in folder(dest, "g")} == before
    failed = read_manifest(dest, run_manifest_key("run-2", "samples")).to_pylist()
    assert [r["status"] for r in failed] == ["failed"]  # the failure lives in its run's manifest


def test_stale_outputs_are_only_the_inputs_own_older_pngs(tmp_path: Path) -> None:
    # dest == source: the output folder `photo/` also holds an input and another input's folder.
    dest = LocalStorage(tmp_path)
    kept = {*sample_keys("photo.png", 0), sheet_key("photo.png")}
    stale = {*sample_keys("photo.png", 1), "photo/sample-12.png"}
    others = {
        "photo.png",  # the input itself
        "photo/x.png",  # another input, inside the output folder
        "photo/sample-1.jpg",  # not a name write_outputs makes
        "photo/notes-sample-1.png",
        "photo/x/sample-3.png",  # photo/x.png's output: not a direct child
        "photo-2/sample-1.png",  # another input's folder that merely shares the prefix
    }
    for key in kept | stale | others:
        dest.write_bytes(key, b"png")
    removed = remove_stale_outputs(dest, "photo.png", keep=kept)
    assert set(removed) == stale
    assert {o.key for o in dest.list()} == kept | others
