"""Specification: `finalize_run` may fail at any storage call and be retried without loss.

A storage wrapper injects a `TransientStorageError` at the N-th read, write or delete, for
every N a fault-free finalisation makes, either before the call takes effect or after it (the
write landed but its answer was lost). After each failure, readers of the index already see the
right rows; a retry then finishes with exactly the row counts, manifests and index of a
fault-free run: nothing lost, nothing twice. On a local folder and on S3 (moto).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pulse_core.manifest import (
    RUNS_PREFIX,
    finalize_run,
    losses_table,
    read_index,
    read_manifest,
    run_manifest_key,
    samples_table,
    write_batch_manifests,
)
from pulse_core.storage import (
    LocalStorage,
    ObjectInfo,
    S3Storage,
    Storage,
    StorageConfig,
    StorageError,
    TransientStorageError,
)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
COUNTED = ("read_bytes", "write_bytes", "delete")


class FaultyStorage(Storage):
    """Delegates to `inner`; the `fail_at`-th counted call raises TransientStorageError.

    `when="before"`: the call does not happen. `when="after"`: it happens, then the caller is
    told it failed (a PUT whose response was lost).
    """

    def __init__(self, inner: Storage, fail_at: int | None = None, when: str = "before") -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.when = when
        self.calls: list[tuple[str, str]] = []

    def _call(self, op: str, key: str, run: Any) -> Any:
        self.calls.append((op, key))
        failing = len(self.calls) == self.fail_at
        if failing and self.when == "before":
            raise TransientStorageError(f"injected fault before {op} {key}")
        try:
            result = run()
        except StorageError:
            if not failing:
                raise
            result = None  # the call failed on its own (a read of a missing key): fault anyway
        if failing:
            raise TransientStorageError(f"injected fault after {op} {key}")
        return result

    @property
    def url(self) -> str:
        return self.inner.url

    def list(self, prefix: str = "", suffixes: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix, suffixes)

    def read_bytes(self, key: str) -> bytes:
        return self._call("read_bytes", key, lambda: self.inner.read_bytes(key))

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._call("write_bytes", key, lambda: self.inner.write_bytes(key, data, content_type))

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.inner.delete(key))

    def child(self, prefix: str) -> Storage:
        return FaultyStorage(self.inner.child(prefix), self.fail_at, self.when)

    def check(self, create: bool = False) -> None:
        self.inner.check(create)


# ---------------------------------------------------------------------------------------------
# The scenario: run-0 finalised earlier; run-1 (three batches) wrote its parts and is finalised


def ok_rows(run_id: str, key: str, samples: int, at: datetime) -> list[dict[str, Any]]:
    return [
        {
            "run_id": run_id,
            "input_key": key,
            "generator_id": "demo",
            "seed": 100 + k,
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


def failed_rows(run_id: str, key: str, samples: int, at: datetime) -> list[dict[str, Any]]:
    return [
        {
            "run_id": run_id,
            "input_key": key,
            "generator_id": "demo",
            "seed": 0,
            "sample_index": k,
            "method": "restart",
            "converged": False,
            "eps": 2e-3,
            "status": "failed",
            "error": "search failed: out of memory",
            "created_at": at,
        }
        for k in range(samples)
    ]


def loss_rows(run_id: str, key: str, samples: int, steps: int = 5) -> list[dict[str, Any]]:
    return [
        {
            "run_id": run_id,
            "input_key": key,
            "sample_index": k,
            "step": step,
            "lr": 0.4,
            "l2": 1.0 / (step + 1),
            "total": 1.0 / (step + 1),
        }
        for k in range(samples)
        for step in range(steps)
    ]


def batch(dest: Storage, run_id: str, batch_id: str, ok: dict[str, int], failed: dict[str, int],
          at: datetime) -> None:  # fmt: skip
    samples = [r for key, n in ok.items() for r in ok_rows(run_id, key, n, at)]
    samples += [r for key, n in failed.items() for r in failed_rows(run_id, key, n, at)]
    losses = [r for key, n in ok.items() for r in loss_rows(run_id, key, n)]
    write_batch_manifests(dest, run_id, batch_id, samples_table(samples), losses_table(losses))


def build(dest: Storage) -> None:
    """run-0 restored a, b, c (3 samples each); run-1 redoes a with 1 sample, fails b (which
    must keep run-0's rows), adds d and f and fails the new input e."""
    batch(dest, "run-0", "0", {"a.png": 3, "b.png": 3}, {}, T0)
    batch(dest, "run-0", "1", {"c.png": 3}, {}, T0)
    finalize_run(dest, "run-0")
    later = T0 + timedelta(hours=1)
    batch(dest, "run-1", "0", {"a.png": 1}, {"b.png": 1}, later)
    batch(dest, "run-1", "1", {"d.png": 2}, {"e.png": 2}, later)
    batch(dest, "run-1", "2", {"f.png": 2}, {}, later)


EXPECTED_INDEX = sorted(
    [("a.png", 0, "run-1")]
    + [(key, k, "run-0") for key in ("b.png", "c.png") for k in range(3)]
    + [(key, k, "run-1") for key in ("d.png", "e.png", "f.png") for k in range(2)]
)
EXPECTED_SAMPLES = 1 + 1 + 2 + 2 + 2  # run-1's rows: a, b (failed), d, e (failed), f
EXPECTED_LOSSES = (1 + 2 + 2) * 5


def index_keys(table: pa.Table) -> list[tuple[str, int, str]]:
    return sorted(
        zip(
            table.column("input_key").to_pylist(),
            table.column("sample_index").to_pylist(),
            table.column("run_id").to_pylist(),
            strict=True,
        )
    )


def raw_index(dest: Storage) -> list[tuple[str, int, str]]:
    rows: list[tuple[str, int, str]] = []
    for info in dest.list(prefix="_manifest/samples/", suffixes=(".parquet",)):
        rows += index_keys(read_manifest(dest, info.key))
    return sorted(rows)


def manifests(dest: Storage) -> tuple[pa.Table, pa.Table]:
    samples = read_manifest(dest, run_manifest_key("run-1", "samples"))
    losses = read_manifest(dest, run_manifest_key("run-1", "losses"))
    return (
        samples.sort_by([("input_key", "ascending"), ("sample_index", "ascending")]),
        losses.sort_by(
            [("input_key", "ascending"), ("sample_index", "ascending"), ("step", "ascending")]
        ),
    )


def parts_left(dest: Storage) -> list[str]:
    return [o.key for o in dest.list(prefix=f"{RUNS_PREFIX}/run-1/parts/")]


# ---------------------------------------------------------------------------------------------
# Storages


@pytest.fixture(params=["local", "s3"])
def new_dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A factory of empty dests, one per fault position."""
    if request.param == "local":
        yield lambda: LocalStorage(tmp_path / uuid.uuid4().hex)
        return
    config = StorageConfig(
        endpoint_url=request.getfixturevalue("moto_endpoint"),
        region="us-east-1",
        access_key="testing",
        secret_key="testing-secret",
        max_attempts=1,
    )
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    S3Storage(bucket, "", config).client.create_bucket(Bucket=bucket)
    yield lambda: S3Storage(bucket, uuid.uuid4().hex, config)


# ---------------------------------------------------------------------------------------------


def test_a_fault_free_finalisation_gives_the_expected_state(new_dest: Any) -> None:
    dest = new_dest()
    build(dest)
    files = finalize_run(dest, "run-1")
    assert (files.samples_rows, files.losses_rows) == (EXPECTED_SAMPLES, EXPECTED_LOSSES)
    assert raw_index(dest) == EXPECTED_INDEX
    assert index_keys(read_index(dest)) == EXPECTED_INDEX
    assert parts_left(dest) == []


@pytest.mark.parametrize(
    ("new_dest", "when"),
    [("local", "before"), ("local", "after"), ("s3", "before")],  # s3-after: 20 s more, no news
    indirect=["new_dest"],
)
def test_finalisation_survives_a_fault_at_every_storage_call(new_dest: Any, when: str) -> None:
    reference = new_dest()
    build(reference)
    counter = FaultyStorage(reference)
    finalize_run(counter, "run-1")
    expected_samples, expected_losses = manifests(reference)
    ops = len(counter.calls)
    assert {op for op, _ in counter.calls} == set(COUNTED)  # every kind of call is faulted

    for n in range(1, ops + 1):
        dest = new_dest()
        build(dest)
        faulty = FaultyStorage(dest, fail_at=n, when=when)
        with pytest.raises(TransientStorageError):
            finalize_run(faulty, "run-1")
        where = f"fault {when} call {n} ({faulty.calls[-1]})"
        assert index_keys(read_index(dest)) == EXPECTED_INDEX, where  # readers lose nothing

        files = finalize_run(dest, "run-1")

        assert (files.samples_rows, files.losses_rows) == (EXPECTED_SAMPLES, EXPECTED_LOSSES), where
        samples, losses = manifests(dest)
        assert samples.equals(expected_samples), where
        assert losses.equals(expected_losses), where
        assert raw_index(dest) == EXPECTED_INDEX, where
        assert parts_left(dest) == [], where


def test_a_retry_after_every_part_was_deleted_keeps_the_manifests(new_dest: Any) -> None:
    dest = new_dest()
    build(dest)
    finalize_run(dest, "run-1")
    files = finalize_run(dest, "run-1")  # nothing left to merge: the manifests stay as they are
    assert (files.samples_rows, files.losses_rows) == (EXPECTED_SAMPLES, EXPECTED_LOSSES)


def test_a_part_row_replaces_the_manifest_row_with_the_same_identity(new_dest: Any) -> None:
    # A batch rewritten after a first finalisation (a late retry) updates its rows, never
    # doubles them.
    dest = new_dest()
    build(dest)
    finalize_run(dest, "run-1")
    later = T0 + timedelta(hours=2)
    batch(dest, "run-1", "2", {"f.png": 2}, {}, later)
    files = finalize_run(dest, "run-1")
    assert (files.samples_rows, files.losses_rows) == (EXPECTED_SAMPLES, EXPECTED_LOSSES)
    samples, _ = manifests(dest)
    f_rows = [r for r in samples.to_pylist() if r["input_key"] == "f.png"]
    assert [r["created_at"] for r in f_rows] == [later, later]
