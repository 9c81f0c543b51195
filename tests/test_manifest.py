"""Specification of pulse_core.manifest: schemas, atomic Parquet files, the de-duplicated index."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pulse_core.manifest import (
    INDEX_PREFIX,
    LOSSES_SCHEMA,
    SAMPLES_SCHEMA,
    SCHEMA_VERSION,
    ManifestError,
    append_to_index,
    compact_index,
    losses_table,
    parquet_bytes,
    part_key,
    read_index,
    read_manifest,
    reconcile_index,
    run_manifest_key,
    samples_table,
    write_parquet,
)
from pulse_core.storage import LOCAL_TMP_PREFIX, LocalStorage, StorageNotFoundError

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def sample_row(input_key: str = "faces/a.png", sample_index: int = 0, **overrides: Any) -> dict:
    """A complete ok row; tests override what they are about."""
    row: dict[str, Any] = {
        "run_id": "run-1",
        "input_key": input_key,
        "input_checksum": "ab" * 32,
        "lr_width": 32,
        "lr_height": 32,
        "factor": 32,
        "fit_policy": "center-crop",
        "fit_box": (0, 0, 64, 64),
        "conversions": ["rgba->rgb"],
        "generator_id": "dcgan-digiface-64",
        "generator_checksum": "cd" * 32,
        "seed": 2**40 + sample_index,
        "sample_index": sample_index,
        "method": "restart",
        "parent_sample": None,
        "steps_run": 100,
        "best_step": 97,
        "final_l2": 1e-3,
        "final_geocross": 0.5,
        "final_total": 1.5e-3,
        "converged": True,
        "eps": 2e-3,
        "output_key": f"a/sample-{sample_index}.png",
        "lr_check_key": f"a/sample-{sample_index}.lr.png",
        "seconds": 3.25,
        "device": "cpu",
        "status": "ok",
        "error": None,
        "created_at": T0,
    }
    row.update(overrides)
    return row


def failed_row(input_key: str = "faces/broken.png", **overrides: Any) -> dict:
    """The row of an input that could not be decoded: only what is known is filled in."""
    row = {
        "run_id": "run-1",
        "input_key": input_key,
        "generator_id": "dcgan-digiface-64",
        "seed": 7,
        "sample_index": 0,
        "method": "restart",
        "converged": False,
        "eps": 2e-3,
        "status": "failed",
        "error": "InputError: cannot decode image",
    }
    row.update(overrides)
    return row


def loss_row(step: int, **overrides: Any) -> dict:
    row = {
        "run_id": "run-1",
        "input_key": "faces/a.png",
        "sample_index": 0,
        "step": step,
        "lr": 0.4,
        "l2": 1.0 / (step + 1),
        "l1": None,
        "geocross": 0.1,
        "total": 1.0 / (step + 1) + 0.1,
    }
    row.update(overrides)
    return row


@pytest.fixture
def dest(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "dest")


def index_keys(table: pa.Table) -> list[tuple[str, int, str]]:
    return sorted(
        zip(
            table.column("input_key").to_pylist(),
            table.column("sample_index").to_pylist(),
            table.column("run_id").to_pylist(),
            strict=True,
        )
    )


# ---------------------------------------------------------------------------------------------
# Schemas and row helpers


def test_schemas_carry_their_version_in_the_metadata() -> None:
    for schema, name in ((SAMPLES_SCHEMA, b"samples"), (LOSSES_SCHEMA, b"losses")):
        assert schema.metadata[b"pulse.schema"] == name
        assert schema.metadata[b"pulse.schema_version"] == str(SCHEMA_VERSION).encode()


def test_samples_table_types_follow_the_schema() -> None:
    table = samples_table([sample_row(), failed_row()])
    assert table.schema.equals(SAMPLES_SCHEMA, check_metadata=True)
    first, second = table.to_pylist()
    assert first["fit_box"] == {"left": 0, "top": 0, "right": 64, "bottom": 64}
    assert first["seed"] == 2**40
    assert first["schema_version"] == SCHEMA_VERSION
    assert second["final_l2"] is None and second["conversions"] == []
    assert second["created_at"].tzinfo is not None


def test_missing_required_field_is_named_in_the_error() -> None:
    row = sample_row()
    del row["seed"]
    with pytest.raises(ManifestError, match=r"samples row 0 lacks required field\(s\) \['seed'\]"):
        samples_table([row])


def test_unknown_field_is_refused_so_typos_never_become_null_columns() -> None:
    with pytest.raises(ManifestError, match="final_L2"):
        samples_table([sample_row(final_L2=0.1)])


def test_required_field_set_to_none_is_refused() -> None:
    with pytest.raises(ManifestError, match="'generator_id' must not be None"):
        samples_table([sample_row(generator_id=None)])


def test_wrong_type_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="do not match the samples schema"):
        samples_table([sample_row(steps_run="many")])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "random"}, "method"),
        ({"status": "done"}, "status"),
        ({"status": "failed", "error": None}, "needs an error message"),
        ({"created_at": datetime(2026, 1, 1)}, "no timezone"),
        ({"fit_box": (1, 2, 3)}, "fit_box"),
    ],
)
def test_values_the_schema_cannot_check_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        samples_table([sample_row(**overrides)])


def test_noise_resample_rows_record_their_parent() -> None:
    table = samples_table([sample_row(sample_index=3, method="noise-resample", parent_sample=0)])
    assert table.column("parent_sample").to_pylist() == [0]


def test_losses_table_round_trips_nullable_terms() -> None:
    table = losses_table([loss_row(s) for s in range(3)])
    assert table.schema.equals(LOSSES_SCHEMA, check_metadata=True)
    assert table.column("l1").null_count == 3
    assert table.column("step").to_pylist() == [0, 1, 2]


def test_losses_row_missing_total_is_refused() -> None:
    row = loss_row(0)
    del row["total"]
    with pytest.raises(ManifestError, match="total"):
        losses_table([row])


# ---------------------------------------------------------------------------------------------
# Files


def test_manifest_round_trips_through_storage(dest: LocalStorage) -> None:
    key = run_manifest_key("run-1", "samples")
    assert key == "_runs/run-1/samples.parquet"
    table = samples_table([sample_row(sample_index=k) for k in range(4)] + [failed_row()])
    write_parquet(dest, key, table)
    back = read_manifest(dest, key)
    assert back.equals(table) and back.schema.metadata == SAMPLES_SCHEMA.metadata
    losses = losses_table([loss_row(s) for s in range(5)])
    write_parquet(dest, run_manifest_key("run-1", "losses"), losses)
    assert read_manifest(dest, run_manifest_key("run-1", "losses")).equals(losses)


def test_write_parquet_leaves_no_temp_files(dest: LocalStorage) -> None:
    write_parquet(dest, "_runs/r/samples.parquet", samples_table([sample_row()]))
    write_parquet(dest, "_runs/r/samples.parquet", samples_table([sample_row()]))
    names = os.listdir(dest.local_path("_runs/r"))
    assert names == ["samples.parquet"]
    assert not any(n.startswith(LOCAL_TMP_PREFIX) for n in names)


def test_a_newer_schema_version_is_refused(dest: LocalStorage) -> None:
    table = samples_table([sample_row()])
    newer = table.replace_schema_metadata(
        {b"pulse.schema": b"samples", b"pulse.schema_version": str(SCHEMA_VERSION + 1).encode()}
    )
    write_parquet(dest, "m.parquet", newer)
    with pytest.raises(ManifestError, match="newer than this code"):
        read_manifest(dest, "m.parquet")


def test_a_corrupt_manifest_is_a_manifest_error(dest: LocalStorage) -> None:
    dest.write_bytes("m.parquet", b"not parquet at all")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_manifest(dest, "m.parquet")


def test_a_missing_manifest_is_not_found(dest: LocalStorage) -> None:
    with pytest.raises(StorageNotFoundError):
        read_manifest(dest, "_runs/none/samples.parquet")


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "run 1"])
def test_part_and_run_names_cannot_leave_their_folder(bad: str) -> None:
    with pytest.raises(ManifestError):
        part_key(bad)
    with pytest.raises(ManifestError):
        run_manifest_key(bad, "samples")


# ---------------------------------------------------------------------------------------------
# The index: newest row per (input_key, sample_index), in the raw folder too


def raw_dataset(dest: LocalStorage) -> pa.Table:
    """What pyarrow (or DuckDB) sees reading the folder directly, with no help from us."""
    return ds.dataset(dest.local_path(INDEX_PREFIX), format="parquet").to_table()


def test_empty_index_reads_as_an_empty_table(dest: LocalStorage) -> None:
    table = read_index(dest)
    assert table.num_rows == 0 and table.schema.equals(SAMPLES_SCHEMA)


def test_first_run_is_indexed_as_written(dest: LocalStorage) -> None:
    rows = [sample_row(sample_index=k) for k in range(3)] + [failed_row()]
    report = append_to_index(dest, samples_table(rows), "run-1")
    assert report is not None and report.removed_rows == 0 and report.rewritten_parts == ()
    assert dest.exists(part_key("run-1"))
    assert read_index(dest).num_rows == 4
    assert raw_dataset(dest).num_rows == 4


def test_rerun_replaces_every_row_of_the_input_in_the_raw_folder(dest: LocalStorage) -> None:
    # The input is the unit of replacement: a redo with fewer samples leaves none of the older
    # run's rows for that input, even for sample indices the redo did not write.
    first = [sample_row("a.png", k) for k in range(2)] + [sample_row("b.png", 0)]
    append_to_index(dest, samples_table(first), "run-1")
    redo = [sample_row("a.png", 1, run_id="run-2", created_at=T0 + timedelta(hours=1))]
    report = append_to_index(dest, samples_table(redo), "run-2")
    assert report is not None and report.removed_rows == 2
    assert report.rewritten_parts == (part_key("run-1"),)
    expected = [("a.png", 1, "run-2"), ("b.png", 0, "run-1")]
    assert index_keys(read_index(dest)) == expected
    assert index_keys(raw_dataset(dest)) == expected


def test_a_part_left_empty_by_a_rerun_is_deleted(dest: LocalStorage) -> None:
    append_to_index(dest, samples_table([sample_row("a.png", 0)]), "run-1")
    redo = samples_table([sample_row("a.png", 0, run_id="run-2", created_at=T0 + timedelta(1))])
    report = append_to_index(dest, redo, "run-2")
    assert report is not None and report.deleted_parts == (part_key("run-1"),)
    assert not dest.exists(part_key("run-1"))
    assert index_keys(raw_dataset(dest)) == [("a.png", 0, "run-2")]


def test_a_failed_rerun_never_displaces_an_earlier_success(dest: LocalStorage) -> None:
    append_to_index(dest, samples_table([sample_row("a.png", 0)]), "run-1")
    later = failed_row("a.png", run_id="run-2", created_at=T0 + timedelta(1))
    append_to_index(dest, samples_table([later]), "run-2")
    assert index_keys(read_index(dest)) == [("a.png", 0, "run-1")]
    assert index_keys(raw_dataset(dest)) == [("a.png", 0, "run-1")]
    assert read_index(dest).column("status").to_pylist() == ["ok"]


def test_a_newer_failure_replaces_an_older_failure(dest: LocalStorage) -> None:
    first = failed_row("a.png", created_at=T0, error="first")
    append_to_index(dest, samples_table([first]), "run-1")
    later = failed_row("a.png", run_id="run-2", created_at=T0 + timedelta(1), error="second")
    append_to_index(dest, samples_table([later]), "run-2")
    assert read_index(dest).column("error").to_pylist() == ["second"]
    assert raw_dataset(dest).num_rows == 1


def test_a_success_after_failures_replaces_them(dest: LocalStorage) -> None:
    failed = [failed_row("a.png", sample_index=k, created_at=T0) for k in range(3)]
    append_to_index(dest, samples_table(failed), "run-1")
    ok = [sample_row("a.png", 0, run_id="run-2", created_at=T0 + timedelta(1))]
    append_to_index(dest, samples_table(ok), "run-2")
    assert index_keys(raw_dataset(dest)) == [("a.png", 0, "run-2")]


def test_a_newer_success_replaces_an_older_success_with_more_samples(
    dest: LocalStorage,
) -> None:
    # Unselected restarts (sample_index >= samples) and selected samples of the older run alike.
    older = [sample_row("a.png", k, selected=k < 3) for k in range(5)]
    append_to_index(dest, samples_table(older), "run-1")
    newer = [
        sample_row("a.png", k, run_id="run-2", created_at=T0 + timedelta(1), selected=k < 1)
        for k in range(2)
    ]
    append_to_index(dest, samples_table(newer), "run-2")
    assert index_keys(raw_dataset(dest)) == [("a.png", 0, "run-2"), ("a.png", 1, "run-2")]


def test_read_index_with_columns_returns_only_those(dest: LocalStorage) -> None:
    append_to_index(dest, samples_table([sample_row("a.png", k) for k in range(2)]), "run-1")
    redo = samples_table([sample_row("a.png", 0, run_id="run-2", created_at=T0 + timedelta(1))])
    append_to_index(dest, redo, "run-2", reconcile=False)
    table = read_index(dest, columns=["output_key", "input_key"])
    assert table.column_names == ["output_key", "input_key"]
    assert table.to_pylist() == [{"output_key": "a/sample-0.png", "input_key": "a.png"}]
    assert table.schema.field("input_key").nullable is False
    empty = read_index(LocalStorage(dest.root / "nothing"), columns=["run_id"])
    assert empty.num_rows == 0 and empty.column_names == ["run_id"]


def test_read_index_refuses_an_unknown_column(dest: LocalStorage) -> None:
    with pytest.raises(ManifestError, match="no column"):
        read_index(dest, columns=["final_L2"])


def test_read_index_columns_fill_in_columns_older_parts_lack(dest: LocalStorage) -> None:
    v1 = samples_table([sample_row("a.png", 0)]).drop_columns(["attempt", "selected"])
    write_parquet(dest, part_key("old"), v1)
    table = read_index(dest, columns=["input_key", "selected", "attempt"])
    assert table.to_pylist() == [{"input_key": "a.png", "selected": True, "attempt": 0}]


def test_retrying_the_same_part_replaces_it(dest: LocalStorage) -> None:
    rows = samples_table([sample_row("a.png", 0)])
    append_to_index(dest, rows, "run-1-batch-0")
    append_to_index(dest, rows, "run-1-batch-0")
    assert raw_dataset(dest).num_rows == 1


def test_duplicates_within_one_append_keep_the_newest(dest: LocalStorage) -> None:
    rows = [
        sample_row("a.png", 0, seconds=1.0, created_at=T0),
        sample_row("a.png", 0, seconds=2.0, created_at=T0 + timedelta(seconds=1)),
    ]
    append_to_index(dest, samples_table(rows), "run-1")
    assert raw_dataset(dest).column("seconds").to_pylist() == [2.0]


def test_read_index_hides_duplicates_until_a_deferred_reconcile(dest: LocalStorage) -> None:
    append_to_index(dest, samples_table([sample_row("a.png", 0)]), "run-1", reconcile=False)
    redo = samples_table([sample_row("a.png", 0, run_id="run-2", created_at=T0 + timedelta(1))])
    assert append_to_index(dest, redo, "run-2", reconcile=False) is None
    assert raw_dataset(dest).num_rows == 2  # concurrent writers deferred the reconcile
    assert index_keys(read_index(dest)) == [("a.png", 0, "run-2")]
    report = reconcile_index(dest)
    assert report.removed_rows == 1 and report.rows == 1
    assert index_keys(raw_dataset(dest)) == [("a.png", 0, "run-2")]


def test_equal_timestamps_still_leave_exactly_one_row(dest: LocalStorage) -> None:
    # A crash between writing a compacted part and deleting the old ones leaves exact copies.
    table = samples_table([sample_row("a.png", 0), sample_row("b.png", 0)])
    append_to_index(dest, table, "copy-1", reconcile=False)
    append_to_index(dest, table, "copy-2", reconcile=False)
    reconcile_index(dest)
    assert index_keys(raw_dataset(dest)) == [("a.png", 0, "run-1"), ("b.png", 0, "run-1")]


def test_compaction_writes_one_part_with_the_newest_rows(dest: LocalStorage) -> None:
    for i in range(3):
        rows = [sample_row(f"{i}.png", 0, run_id=f"run-{i}")]
        rows.append(sample_row("shared.png", 0, run_id=f"run-{i}", created_at=T0 + timedelta(i)))
        append_to_index(dest, samples_table(rows), f"run-{i}", reconcile=False)
    report = compact_index(dest, "compacted")
    assert report.parts == 1 and report.removed_rows == 2
    assert [o.key for o in dest.list(INDEX_PREFIX + "/")] == [part_key("compacted")]
    assert ("shared.png", 0, "run-2") in index_keys(raw_dataset(dest))
    assert raw_dataset(dest).num_rows == 4
    assert read_index(dest).equals(
        read_manifest(dest, part_key("compacted")).sort_by(
            [("input_key", "ascending"), ("sample_index", "ascending")]
        )
    )


def test_index_reconcile_reads_through_plain_parquet_files(dest: LocalStorage) -> None:
    # Parts are ordinary Parquet files with the full schema: any tool can read them.
    append_to_index(dest, samples_table([sample_row()]), "run-1")
    table = pq.read_table(dest.local_path(part_key("run-1")))
    assert table.schema.equals(SAMPLES_SCHEMA)


def test_append_refuses_tables_without_the_samples_columns(dest: LocalStorage) -> None:
    with pytest.raises(ManifestError, match="samples_table"):
        append_to_index(dest, pa.table({"input_key": ["a"]}), "run-1")


def test_index_ignores_files_that_are_not_parts(dest: LocalStorage) -> None:
    append_to_index(dest, samples_table([sample_row()]), "run-1")
    dest.write_bytes(f"{INDEX_PREFIX}/README.txt", b"not a part")
    dest.write_bytes(f"{INDEX_PREFIX}/nested/part-x.parquet", parquet_bytes(pa.table({"a": [1]})))
    assert read_index(dest).num_rows == 1
    assert reconcile_index(dest).parts == 1


def test_reconcile_never_rewrites_a_part_from_a_newer_schema(dest: LocalStorage) -> None:
    # An older build would drop the newer part's unknown columns while trimming it.
    newer = samples_table([sample_row("a.png", 0)]).replace_schema_metadata(
        {b"pulse.schema": b"samples", b"pulse.schema_version": str(SCHEMA_VERSION + 1).encode()}
    )
    write_parquet(dest, part_key("from-the-future"), newer)
    with pytest.raises(ManifestError, match="newer than this code"):
        append_to_index(dest, samples_table([sample_row("a.png", 0, created_at=T0)]), "run-1")
    assert pq.read_table(dest.local_path(part_key("from-the-future"))).equals(newer)


# ---------------------------------------------------------------------------------------------
# Schema version 3: faces of whole photos, the "no-faces" status, upgrading version 2 files

V3_SAMPLES_COLUMNS = (
    "face_index",
    "face_box",
    "face_landmarks",
    "face_score",
    "face_recipe",
    "photo_output_key",
    "upscale",
)
LANDMARKS = [[10.0, 20.0], [30.0, 20.0], [20.0, 30.0], [12.0, 40.0], [28.0, 40.0]]


def face_row(input_key: str, face: int, sample: int, **overrides: Any) -> dict:
    """An ok row of one face of a whole photo (folders as the pipeline writes them)."""
    base = input_key.rsplit(".", 1)[0]
    row = sample_row(
        input_key,
        sample,
        output_key=f"{base}/face-{face}/sample-{sample}.png",
        lr_check_key=f"{base}/face-{face}/sample-{sample}-lr.png",
        fit_policy="align",
        fit_box=None,
        face_index=face,
        face_box=(5.0 + 40 * face, 10.0, 35.0 + 40 * face, 45.0),
        face_landmarks=LANDMARKS,
        face_score=0.99,
        face_recipe="digiface",
        photo_output_key=f"{base}/restored.png",
        upscale=2,
    )
    row.update(overrides)
    return row


def no_faces_row(input_key: str, **overrides: Any) -> dict:
    row = failed_row(input_key, status="no-faces", error="no face found", created_at=T0)
    row.update(overrides)
    return row


def as_version_2(table: pa.Table, losses: bool = False) -> pa.Table:
    """`table` as a version 2 build wrote it: no face columns, version 2 in data and metadata."""
    dropped = ("face_index",) if losses else V3_SAMPLES_COLUMNS
    table = table.drop_columns(list(dropped))
    version = pa.array([2] * table.num_rows, pa.int32())
    table = table.set_column(0, table.schema.field(0), version)
    name = b"losses" if losses else b"samples"
    return table.replace_schema_metadata({b"pulse.schema": name, b"pulse.schema_version": b"2"})


def identities3(table: pa.Table) -> list[tuple[str, int | None, int, str]]:
    cols = ("input_key", "face_index", "sample_index", "run_id")
    rows = zip(*(table.column(c).to_pylist() for c in cols), strict=True)
    return sorted(rows, key=lambda r: (r[0], -1 if r[1] is None else r[1], r[2], r[3]))


def test_face_rows_keep_box_and_landmarks_in_photo_coordinates() -> None:
    table = samples_table([face_row("p.jpg", 1, 0)])
    row = table.to_pylist()[0]
    assert row["face_index"] == 1
    assert row["face_box"] == {"x0": 45.0, "y0": 10.0, "x1": 75.0, "y1": 45.0}
    assert row["face_landmarks"] == [v for point in LANDMARKS for v in point]
    assert table.schema.field("face_landmarks").type == pa.list_(pa.float32())
    assert table.schema.field("face_box").type.field("x0").type == pa.float32()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"face_landmarks": [1.0, 2.0, 3.0]}, "5 finite"),
        ({"face_landmarks": [[float("nan"), 0.0]] * 5}, "5 finite"),
        ({"face_box": "left"}, "face_box"),
    ],
)
def test_bad_face_columns_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        samples_table([face_row("p.jpg", 0, 0, **overrides)])


def test_a_no_faces_row_needs_its_reason() -> None:
    assert samples_table([no_faces_row("rocket.jpg")]).column("status").to_pylist() == ["no-faces"]
    with pytest.raises(ManifestError, match="no-faces row needs its reason"):
        samples_table([no_faces_row("rocket.jpg", error=None)])


def test_faces_of_one_photo_are_distinct_identities_in_the_index(dest: LocalStorage) -> None:
    rows = [face_row("p.jpg", f, k) for f in range(3) for k in range(2)]
    rows.append(sample_row("p.jpg", 0, run_id="run-0", created_at=T0 - timedelta(days=1)))
    append_to_index(dest, samples_table(rows), "run-1")
    got = identities3(read_index(dest))
    assert got == [("p.jpg", f, k, "run-1") for f in range(3) for k in range(2)]
    assert identities3(raw_dataset(dest)) == got  # the older whole-input row was replaced


def test_a_rerun_that_finds_fewer_faces_replaces_every_face_row(dest: LocalStorage) -> None:
    append_to_index(dest, samples_table([face_row("p.jpg", f, 0) for f in range(3)]), "run-1")
    later = T0 + timedelta(hours=1)
    redo = [face_row("p.jpg", 0, 0, run_id="run-2", created_at=later)]
    append_to_index(dest, samples_table(redo), "run-2")
    assert identities3(raw_dataset(dest)) == [("p.jpg", 0, 0, "run-2")]


def test_a_failure_never_displaces_a_no_faces_result(dest: LocalStorage) -> None:
    append_to_index(dest, samples_table([no_faces_row("rocket.jpg")]), "run-1")
    later = failed_row("rocket.jpg", run_id="run-2", created_at=T0 + timedelta(hours=1))
    append_to_index(dest, samples_table([later]), "run-2")
    assert read_index(dest).column("status").to_pylist() == ["no-faces"]
    found = face_row("rocket.jpg", 0, 0, run_id="run-3", created_at=T0 + timedelta(hours=2))
    append_to_index(dest, samples_table([found]), "run-3")  # a better detector found one
    assert identities3(raw_dataset(dest)) == [("rocket.jpg", 0, 0, "run-3")]


def test_version_2_parts_upgrade_on_read_with_null_face_columns(dest: LocalStorage) -> None:
    v2 = as_version_2(samples_table([sample_row("a.png", 0), sample_row("a.png", 1)]))
    write_parquet(dest, part_key("old"), v2)
    table = read_index(dest)
    assert table.num_rows == 2 and table.schema.equals(SAMPLES_SCHEMA)
    assert set(table.column("face_index").to_pylist()) == {None}
    assert set(table.column("face_box").to_pylist()) == {None}
    assert identities3(table) == [("a.png", None, 0, "run-1"), ("a.png", None, 1, "run-1")]
    # a version 3 run redoing the same input replaces the old part's rows, identities intact
    redo = samples_table([sample_row("a.png", 0, run_id="run-2", created_at=T0 + timedelta(1))])
    append_to_index(dest, redo, "run-2")
    assert identities3(raw_dataset(dest)) == [("a.png", None, 0, "run-2")]


def test_a_version_2_run_manifest_merges_with_version_3_parts(dest: LocalStorage) -> None:
    from pulse_core.manifest import finalize_run, write_batch_manifests

    old_samples = as_version_2(samples_table([sample_row("a.png", 0)]))
    old_losses = as_version_2(
        losses_table([loss_row(s, input_key="a.png") for s in range(2)]), True
    )
    write_parquet(dest, run_manifest_key("run-1", "samples"), old_samples)
    write_parquet(dest, run_manifest_key("run-1", "losses"), old_losses)
    faces = samples_table([face_row("p.jpg", f, 0) for f in range(2)])
    face_losses = losses_table(
        [loss_row(s, input_key="p.jpg", face_index=f) for f in range(2) for s in range(2)]
    )
    write_batch_manifests(dest, "run-1", "00001", faces, face_losses)
    files = finalize_run(dest, "run-1")
    assert (files.samples_rows, files.losses_rows) == (3, 6)
    losses = read_manifest(dest, files.losses_key)
    assert losses.schema.equals(LOSSES_SCHEMA)
    ids = sorted(
        zip(losses["input_key"].to_pylist(), losses["face_index"].to_pylist(), strict=True),
        key=str,
    )
    assert ids == sorted([("a.png", None)] * 2 + [("p.jpg", 0)] * 2 + [("p.jpg", 1)] * 2, key=str)
    samples = read_manifest(dest, files.samples_key)
    assert identities3(samples) == [
        ("a.png", None, 0, "run-1"),
        ("p.jpg", 0, 0, "run-1"),
        ("p.jpg", 1, 0, "run-1"),
    ]
