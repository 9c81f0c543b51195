"""Specification: what a crashed run leaves in dest, the next run adopts or cleans.

A crash (kill -9, an OOM-killed pod) leaves batch parts under `_runs/<id>/parts/`, index rows
citing a run id with no run manifest, and, on local storage, `.pulse-tmp-*` files of
interrupted atomic writes. `adopt_leftovers` finalises such runs once their newest part is older
than `older_than` and deletes old temp files; younger leftovers may belong to a live run and
are left alone.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pulse_core.atomic import LOCAL_TMP_PREFIX
from pulse_core.manifest import (
    RUNS_PREFIX,
    adopt_leftovers,
    index_run_ids_without_manifest,
    losses_table,
    part_manifest_key,
    read_manifest,
    run_manifest_key,
    samples_table,
    write_batch_manifests,
)
from pulse_core.storage import LocalStorage, S3Storage, Storage, StorageConfig, open_storage

HOUR = timedelta(hours=1)
LONG_AGO = datetime.now(UTC) - timedelta(days=2)


def rows(run_id: str, key: str, samples: int = 2) -> tuple[list[dict], list[dict]]:
    at = datetime.now(UTC)
    sample_rows = [
        {
            "run_id": run_id,
            "input_key": key,
            "generator_id": "demo",
            "seed": k,
            "sample_index": k,
            "method": "restart",
            "converged": True,
            "eps": 2e-3,
            "output_key": f"{key[:-4]}/sample-{k}.png",
            "status": "ok",
            "created_at": at,
        }
        for k in range(samples)
    ]
    loss_rows = [
        {
            "run_id": run_id,
            "input_key": key,
            "sample_index": k,
            "step": step,
            "lr": 0.4,
            "l2": 0.1,
            "total": 0.1,
        }
        for k in range(samples)
        for step in range(3)
    ]
    return sample_rows, loss_rows


def crash_batch(dest: Storage, run_id: str, batch_id: str, key: str) -> None:
    """What a batch writes before its run dies: parts and an index part, no finalisation."""
    samples, losses = rows(run_id, key)
    write_batch_manifests(dest, run_id, batch_id, samples_table(samples), losses_table(losses))


def age(dest: LocalStorage, *keys: str) -> None:
    for key in keys:
        stamp = LONG_AGO.timestamp()
        os.utime(dest.local_path(key), (stamp, stamp))


def parts(dest: Storage, run_id: str) -> list[str]:
    return [o.key for o in dest.list(prefix=f"{RUNS_PREFIX}/{run_id}/parts/")]


@pytest.fixture
def dest(tmp_path: Path) -> LocalStorage:
    storage = LocalStorage(tmp_path / "dest")
    storage.check(create=True)
    return storage


def crashed_run_parts(run_id: str) -> list[str]:
    return [part_manifest_key(run_id, kind, b) for kind in ("samples", "losses") for b in "01"]


def test_a_crashed_runs_parts_are_merged_into_its_manifest(dest: LocalStorage) -> None:
    crash_batch(dest, "crashed", "0", "a.png")
    crash_batch(dest, "crashed", "1", "b.png")
    age(dest, *crashed_run_parts("crashed"))
    assert index_run_ids_without_manifest(dest) == {"crashed"}

    report = adopt_leftovers(dest, current_run_id="now", older_than=HOUR)

    assert report.adopted_runs == ("crashed",)
    assert parts(dest, "crashed") == []
    samples = read_manifest(dest, run_manifest_key("crashed", "samples"))
    losses = read_manifest(dest, run_manifest_key("crashed", "losses"))
    assert (samples.num_rows, losses.num_rows) == (4, 12)
    assert index_run_ids_without_manifest(dest) == set()


def test_a_crash_is_adopted_while_a_live_run_and_its_writes_are_left_alone(
    dest: LocalStorage,
) -> None:
    crash_batch(dest, "crashed", "0", "a.png")
    crash_batch(dest, "crashed", "1", "b.png")
    crash_batch(dest, "live", "0", "c.png")
    temp = f"a/{LOCAL_TMP_PREFIX}sample-0.png-{uuid.uuid4().hex}"
    dest.local_path(temp).parent.mkdir(parents=True, exist_ok=True)
    dest.local_path(temp).write_bytes(b"half a png")
    age(dest, *crashed_run_parts("crashed"), temp)

    report = adopt_leftovers(dest, current_run_id="now", older_than=HOUR)

    assert report.adopted_runs == ("crashed",) and report.waiting_runs == ("live",)
    assert dest.exists(run_manifest_key("crashed", "samples"))
    assert parts(dest, "crashed") == [] and len(parts(dest, "live")) == 2
    assert report.removed_temp_files == (temp,) and not dest.local_path(temp).exists()
    assert index_run_ids_without_manifest(dest) == {"live"}


def test_a_run_with_a_fresh_part_is_left_alone(dest: LocalStorage) -> None:
    crash_batch(dest, "live", "0", "a.png")
    crash_batch(dest, "live", "1", "b.png")
    age(dest, part_manifest_key("live", "samples", "0"))  # only its first batch is old

    report = adopt_leftovers(dest, current_run_id="now", older_than=HOUR)

    assert report.adopted_runs == () and report.waiting_runs == ("live",)
    assert len(parts(dest, "live")) == 4
    assert not dest.exists(run_manifest_key("live", "samples"))
    assert index_run_ids_without_manifest(dest) == {"live"}  # until it finishes or is adopted


def test_the_current_run_is_never_adopted(dest: LocalStorage) -> None:
    crash_batch(dest, "now", "0", "a.png")
    age(dest, *[part_manifest_key("now", kind, "0") for kind in ("samples", "losses")])
    report = adopt_leftovers(dest, current_run_id="now", older_than=HOUR)
    assert report.adopted_runs == () and len(parts(dest, "now")) == 2


def test_old_temp_files_are_deleted_and_young_ones_kept(dest: LocalStorage) -> None:
    old = f"a/{LOCAL_TMP_PREFIX}sample-0.png-{uuid.uuid4().hex}"
    deep = f"x/y/{LOCAL_TMP_PREFIX}part.parquet-{uuid.uuid4().hex}"
    young = f"a/{LOCAL_TMP_PREFIX}sample-1.png-{uuid.uuid4().hex}"
    for key in (old, deep, young, "a/sample-0.png"):
        path = dest.local_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a png")
    age(dest, old, deep, "a/sample-0.png")

    report = adopt_leftovers(dest, current_run_id="now", older_than=HOUR)

    assert sorted(report.removed_temp_files) == sorted([old, deep])
    assert not dest.local_path(old).exists() and not dest.local_path(deep).exists()
    assert dest.local_path(young).exists()
    assert dest.exists("a/sample-0.png")  # an old output is not a temp file


def test_adopting_twice_is_harmless(dest: LocalStorage) -> None:
    crash_batch(dest, "crashed", "0", "a.png")
    age(dest, *[part_manifest_key("crashed", kind, "0") for kind in ("samples", "losses")])
    adopt_leftovers(dest, current_run_id="now", older_than=HOUR)
    again = adopt_leftovers(dest, current_run_id="now", older_than=HOUR)
    assert again.adopted_runs == () and again.reconcile is None
    assert read_manifest(dest, run_manifest_key("crashed", "samples")).num_rows == 2


def test_a_corrupt_part_does_not_block_other_adoptions(dest: LocalStorage) -> None:
    crash_batch(dest, "good", "0", "a.png")
    dest.write_bytes(part_manifest_key("bad", "samples", "0"), b"not parquet")
    old = [part_manifest_key("good", kind, "0") for kind in ("samples", "losses")]
    age(dest, *old, part_manifest_key("bad", "samples", "0"))

    report = adopt_leftovers(dest, current_run_id="now", older_than=HOUR)

    assert report.adopted_runs == ("good",)
    assert [run for run, _ in report.failed_runs] == ["bad"]
    assert parts(dest, "bad") == [part_manifest_key("bad", "samples", "0")]  # kept for a look


# ---------------------------------------------------------------------------------------------
# S3 (moto and SeaweedFS): mtimes are the server's LastModified, so the reference clock moves instead


@pytest.fixture(params=["moto", "seaweedfs"])
def s3(request: pytest.FixtureRequest) -> Any:
    if request.param == "seaweedfs":  # a real S3 server (tests/s3_server.py)
        server = request.getfixturevalue("seaweedfs")
        url = server.url(prefix=f"adopt-{uuid.uuid4().hex[:12]}")
        return open_storage(url, server.storage_config())
    config = StorageConfig(
        endpoint_url=request.getfixturevalue("moto_endpoint"),
        region="us-east-1",
        access_key="testing",
        secret_key="testing-secret",
        max_attempts=1,
    )
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    S3Storage(bucket, "", config).client.create_bucket(Bucket=bucket)
    return S3Storage(bucket, "restored", config)


def test_a_crashed_run_on_s3_is_adopted_once_its_parts_are_old(s3: S3Storage) -> None:
    crash_batch(s3, "crashed", "0", "a.png")

    fresh = adopt_leftovers(s3, current_run_id="now", older_than=HOUR)
    assert fresh.waiting_runs == ("crashed",) and len(parts(s3, "crashed")) == 2

    later = datetime.now(UTC) + 2 * HOUR
    report = adopt_leftovers(s3, current_run_id="now", older_than=HOUR, now=later)
    assert report.adopted_runs == ("crashed",) and report.removed_temp_files == ()
    assert parts(s3, "crashed") == []
    assert read_manifest(s3, run_manifest_key("crashed", "losses")).num_rows == 6
    assert index_run_ids_without_manifest(s3) == set()
