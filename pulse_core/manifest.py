"""Manifests: the Parquet record of what a run produced (Arrow schemas declared once, here).

Two tables, both versioned (`SCHEMA_VERSION`, also stored in the schema metadata under
`pulse.schema_version`, so a reader can tell a file from an older or newer build):
- samples: one row per (input, sample): where it came from, how it was made, how well it fits
  and where its PNG lies; failed inputs get a row with status "failed" and the error message.
- losses: one row per (input, sample, step): the optimisation history, for plots and debugging.

Each run writes its own pair under `dest/_runs/<run id>/{samples,losses}.parquet`
(`run_manifest_key`). Files are built in memory and written with one atomic storage write (a
local temp file + rename, or one S3 PUT), so a reader never sees half a Parquet file.

The dataset index: `dest/_manifest/samples/`
--------------------------------------------
To answer "what does dest hold?" across runs without reading every run, the samples rows are also
appended to a dataset index, one Parquet file ("part") per writer:

    dest/_manifest/samples/part-<name>.parquet     name = run id (+ batch), [A-Za-z0-9._-]+

All parts share `SAMPLES_SCHEMA`, so the folder reads directly as one table:

    pyarrow.dataset.dataset("dest/_manifest/samples", format="parquet")   # or s3://...
    duckdb: SELECT * FROM read_parquet('dest/_manifest/samples/*.parquet')

Guarantee: after `append_to_index` (reconcile on, the default) or `reconcile_index` returns,
every (input_key, sample_index) appears in exactly one row of the folder, so a plain dataset read
of the raw folder has no duplicates after re-runs. How: the identity of a row is (input_key,
sample_index); the newest row wins, ordered by (created_at, run_id, part name, row position).
Reconciling reads only the key columns of every part, and rewrites (atomically) just the parts
holding superseded rows, deleting parts left empty. A run that adds new inputs rewrites nothing.

Why this order of steps: the new part is written first and older parts are trimmed after it.
A crash in between leaves a duplicate (never a lost row), which `read_index` already hides
(it applies the same newest-wins rule) and the next reconcile removes. Trimming first could lose
the only copy of a row.

Writers: writing the same part name again replaces that part, so a retried task is idempotent.
Reconciling is read-modify-write without locks (S3 has no rename and no cheap lock), so run it
from one writer at a time: concurrent batch tasks of one run append with `reconcile=False`, and
the flow calls `reconcile_index` (or `compact_index`) once when they are done. A lost race only
ever leaves duplicates that `read_index` hides and the next reconcile removes.

`compact_index` rewrites the whole index into one part (fewer, larger files for readers), also
newest-wins. Bump `SCHEMA_VERSION` on any incompatible change and let compaction migrate.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pulse_core.errors import PulseError
from pulse_core.storage import Storage, StorageNotFoundError

SCHEMA_VERSION = 2  # 2 added attempt, selected, intermediate_layers, intermediate_radius
RUNS_PREFIX = "_runs"  # dest/_runs/<run id>/{samples,losses}.parquet
INDEX_PREFIX = "_manifest/samples"  # dest/_manifest/samples/part-<name>.parquet
METHODS = ("restart", "noise-resample")
STATUSES = ("ok", "failed")
KEY_COLUMNS = ("input_key", "sample_index")  # a sample's identity in the index
PARQUET_COMPRESSION = "zstd"

_PART_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class ManifestError(PulseError, ValueError):
    """A manifest row or file does not match its schema (missing field, wrong type, version)."""


# ---------------------------------------------------------------------------------------------
# Schemas


def _metadata(name: str) -> dict[bytes, bytes]:
    return {
        b"pulse.schema": name.encode(),
        b"pulse.schema_version": str(SCHEMA_VERSION).encode(),
    }


FIT_BOX_TYPE = pa.struct(
    [
        pa.field("left", pa.int32(), nullable=False),  # input pixel coordinates, PIL box order
        pa.field("top", pa.int32(), nullable=False),
        pa.field("right", pa.int32(), nullable=False),  # exclusive
        pa.field("bottom", pa.int32(), nullable=False),  # exclusive
    ]
)

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("input_key", pa.string(), nullable=False),  # key relative to the source root
        pa.field("input_checksum", pa.string()),  # sha256 of the input bytes; None if unreadable
        pa.field("lr_width", pa.int32()),  # LR size the search matched; None for failed inputs
        pa.field("lr_height", pa.int32()),
        pa.field("factor", pa.int32()),  # HR size / LR size
        pa.field("fit_policy", pa.string()),  # how the input was fitted to the LR size
        pa.field("fit_box", FIT_BOX_TYPE),  # region of the input used; None = whole image
        pa.field("conversions", pa.list_(pa.string()), nullable=False),  # e.g. ["rgba->rgb"]
        pa.field("generator_id", pa.string(), nullable=False),  # catalogue name or file name
        pa.field("generator_checksum", pa.string()),  # sha256 of the weights
        pa.field("seed", pa.int64(), nullable=False),  # the sample's own seed
        pa.field("sample_index", pa.int32(), nullable=False),  # k in sample-<k>.png
        pa.field("method", pa.string(), nullable=False),  # "restart" | "noise-resample"
        pa.field("parent_sample", pa.int32()),  # noise-resample: sample whose latent it kept
        pa.field(
            "attempt", pa.int32(), nullable=False
        ),  # restart number of this input (seed source)
        pa.field("selected", pa.bool_(), nullable=False),  # among the returned samples; False:
        # an extra restart kept for the record (sample_index >= samples, no PNG)
        pa.field("intermediate_layers", pa.list_(pa.string()), nullable=False),  # offset split
        # points of the intermediate-layer mode; [] = plain PULSE
        pa.field("intermediate_radius", pa.float64()),  # their ball radius (relative); None = off
        pa.field("steps_run", pa.int32()),
        pa.field("best_step", pa.int32()),
        pa.field("final_l2", pa.float64()),  # at the best step
        pa.field("final_geocross", pa.float64()),
        pa.field("final_total", pa.float64()),
        pa.field("converged", pa.bool_(), nullable=False),  # final_l2 <= eps (False if failed)
        pa.field("eps", pa.float64(), nullable=False),
        pa.field("output_key", pa.string()),  # HR PNG key relative to dest; None if failed
        pa.field("lr_check_key", pa.string()),  # DS(HR) PNG key, for eyeballing the fit
        pa.field("seconds", pa.float64()),  # wall time spent on this sample's share
        pa.field("device", pa.string()),  # "cuda:0", "cpu", ...
        pa.field("status", pa.string(), nullable=False),  # "ok" | "failed"
        pa.field("error", pa.string()),  # what went wrong; required when status is "failed"
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata=_metadata("samples"),
)

LOSSES_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("input_key", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("lr", pa.float64(), nullable=False),  # learning rate used at this step
        pa.field("l2", pa.float64(), nullable=False),
        pa.field("l1", pa.float64()),  # None when the loss has no L1 term
        pa.field("geocross", pa.float64()),  # None when the generator has no GEOCROSS term
        pa.field("total", pa.float64(), nullable=False),
    ],
    metadata=_metadata("losses"),
)

# Filled in when a row leaves them out (samples also get created_at = now); every other
# non-nullable field is required.
_DEFAULTS: dict[str, Any] = {
    "schema_version": SCHEMA_VERSION,
    "conversions": [],
    "attempt": 0,
    "selected": True,
    "intermediate_layers": [],
}
# Columns added after version 1, with the value they mean for rows written before them.
_ADDED_COLUMNS: dict[str, Any] = {
    "attempt": 0,
    "selected": True,
    "intermediate_layers": [],
    "intermediate_radius": None,
}


# ---------------------------------------------------------------------------------------------
# Rows -> tables


def _check_rows(
    rows: Sequence[Mapping[str, Any]],
    schema: pa.Schema,
    name: str,
    defaults: Mapping[str, Any],
) -> list[dict]:
    """Rows completed with `defaults`; a missing or unknown field is a ManifestError.

    Unknown fields are refused rather than dropped: a typo ("final_L2") would otherwise silently
    become a column of nulls.
    """
    names = set(schema.names)
    defaults = {k: v for k, v in defaults.items() if k in names}
    required = {f.name for f in schema if not f.nullable}
    out: list[dict] = []
    for i, row in enumerate(rows):
        keys = row.keys()
        missing = required - keys - defaults.keys()
        if missing:
            raise ManifestError(f"{name} row {i} lacks required field(s) {sorted(missing)}")
        unknown = keys - names
        if unknown:
            raise ManifestError(
                f"{name} row {i} has unknown field(s) {sorted(unknown)}; "
                f"the {name} schema has {schema.names}"
            )
        full = {k: v for k, v in defaults.items() if k not in keys}
        full.update(row)
        for key in required:
            if full[key] is None:
                raise ManifestError(f"{name} row {i}: field {key!r} must not be None")
        out.append(full)
    return out


def _to_table(rows: list[dict], schema: pa.Schema, name: str) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
        raise ManifestError(f"{name} rows do not match the {name} schema: {exc}") from exc


def _fit_box(value: Any) -> Any:
    """Accept a PIL-style (left, top, right, bottom) tuple as well as a dict."""
    if value is None or isinstance(value, Mapping):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 4:
        return dict(zip(("left", "top", "right", "bottom"), value, strict=True))
    raise ManifestError(f"fit_box must be (left, top, right, bottom) or a dict, not {value!r}")


def samples_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validate sample rows (one dict per (input, sample)) into a SAMPLES_SCHEMA table.

    Defaults: schema_version, conversions=[] and created_at=now (UTC). Besides types, checks
    the values the schema cannot: method and status vocabularies, an error message on every
    failed row, timezone-aware created_at.
    """
    defaults = {**_DEFAULTS, "created_at": datetime.now(UTC)}
    checked = _check_rows(rows, SAMPLES_SCHEMA, "samples", defaults)
    for i, row in enumerate(checked):
        created = row["created_at"]
        if isinstance(created, datetime) and created.tzinfo is None:
            raise ManifestError(
                f"samples row {i}: created_at {created} has no timezone; use datetime.now(UTC)"
            )
        if row["method"] not in METHODS:
            raise ManifestError(f"samples row {i}: method {row['method']!r} not in {METHODS}")
        if row["status"] not in STATUSES:
            raise ManifestError(f"samples row {i}: status {row['status']!r} not in {STATUSES}")
        if row["status"] == "failed" and not row.get("error"):
            raise ManifestError(f"samples row {i}: a failed row needs an error message")
        if "fit_box" in row:
            row["fit_box"] = _fit_box(row["fit_box"])
    return _to_table(checked, SAMPLES_SCHEMA, "samples")


def losses_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validate loss-history rows (one dict per (input, sample, step)) into LOSSES_SCHEMA."""
    return _to_table(_check_rows(rows, LOSSES_SCHEMA, "losses", _DEFAULTS), LOSSES_SCHEMA, "losses")


# ---------------------------------------------------------------------------------------------
# Files


def run_manifest_key(run_id: str, kind: str) -> str:
    """Where a run's manifest lies under dest: `_runs/<run id>/<kind>.parquet`."""
    if kind not in ("samples", "losses"):
        raise ManifestError(f"manifest kind must be 'samples' or 'losses', not {kind!r}")
    if not _PART_NAME.match(run_id):
        raise ManifestError(f"run id {run_id!r} must match [A-Za-z0-9._-]+ to name a folder")
    return f"{RUNS_PREFIX}/{run_id}/{kind}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as one Parquet file in memory (zstd; schema metadata kept)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION)
    return sink.getvalue()


def write_parquet(storage: Storage, key: str, table: pa.Table) -> None:
    """Write `table` to `key` atomically.

    The file is built in memory, then handed to one storage write, which is atomic on both
    backends (local: temp file + fsync + rename; S3: one PUT, or a multipart upload that only
    becomes visible on completion). No half-written file is ever visible under `key`.
    """
    storage.write_bytes(key, parquet_bytes(table), content_type="application/vnd.apache.parquet")


def read_manifest(storage: Storage, key: str) -> pa.Table:
    """Read a manifest; refuse one written by a newer schema version than this code knows."""
    return _read_parquet(storage, key)


def _read_parquet(storage: Storage, key: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Parse a stored Parquet file, refusing a newer schema version.

    Refusing matters beyond reading: reconciling rewrites parts, and an older build rewriting
    a newer part would silently drop the columns it does not know.
    """
    data = storage.read_bytes(key)
    try:
        table = pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{storage.url}/{key} is not a readable Parquet file: {exc}") from exc
    version = _file_version(table.schema)
    if version is not None and version > SCHEMA_VERSION:
        raise ManifestError(
            f"{storage.url}/{key} has manifest schema version {version}, newer than this code "
            f"({SCHEMA_VERSION}): upgrade pulse-pipeline to read it"
        )
    return table


def _file_version(schema: pa.Schema) -> int | None:
    raw = (schema.metadata or {}).get(b"pulse.schema_version")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# The dataset index under dest/_manifest/samples/


@dataclass(frozen=True)
class ReconcileReport:
    """What a reconcile or compaction did (for logs and Prefect artifacts)."""

    parts: int  # parts in the index afterwards
    rows: int  # rows in the index afterwards (one per sample identity)
    removed_rows: int  # superseded rows removed
    rewritten_parts: tuple[str, ...]  # keys (relative to dest) of parts rewritten
    deleted_parts: tuple[str, ...]  # keys of parts deleted (left empty, or compacted away)


def part_key(part_name: str) -> str:
    """The key of a part of the index: `_manifest/samples/part-<part_name>.parquet`."""
    if not _PART_NAME.match(part_name):
        raise ManifestError(
            f"part name {part_name!r} must match [A-Za-z0-9._-]+ (use the run id, and a batch "
            "number when one run writes several parts)"
        )
    return f"{INDEX_PREFIX}/part-{part_name}.parquet"


def _index_parts(storage: Storage) -> list[str]:
    """Part keys (relative to dest), sorted; only `part-*.parquet` directly in the folder."""
    folder = f"{INDEX_PREFIX}/"
    parts = []
    for info in storage.list(folder, suffixes=(".parquet",)):
        name = info.key[len(folder) :]
        if "/" not in name and name.startswith("part-"):
            parts.append(info.key)
    return parts


def _winner_mask(table: pa.Table, order: Sequence[tuple[str, str]]) -> pa.Array:
    """Boolean mask of the rows that win their (input_key, sample_index) group.

    Sorts once by key then by `order` (descending: newest first) and keeps the first row of
    each key run; vectorised so an index of millions of rows reconciles in about a second.
    """
    n = table.num_rows
    if n == 0:
        return pa.array([], type=pa.bool_())
    sort_keys = [(k, "ascending") for k in KEY_COLUMNS] + list(order)
    indices = pc.sort_indices(table, sort_keys=sort_keys)
    sorted_keys = table.select(list(KEY_COLUMNS)).take(indices)
    first = pa.array([True])
    if n > 1:
        changed = None
        for column in KEY_COLUMNS:
            col = sorted_keys.column(column).combine_chunks()
            diff = pc.not_equal(col.slice(1), col.slice(0, n - 1))
            changed = diff if changed is None else pc.or_(changed, diff)
        first = pa.concat_arrays([first, changed])
    keep = pc.array_take(first, pc.sort_indices(indices))  # back to the original row order
    return keep


_NEWEST_FIRST = [
    ("created_at", "descending"),
    ("run_id", "descending"),
    ("_part", "descending"),
    ("_row", "descending"),
]


def _with_position(table: pa.Table, part: str) -> pa.Table:
    table = table.append_column("_part", pa.array([part] * table.num_rows, pa.string()))
    return table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))


def _latest(table: pa.Table) -> pa.Table:
    """Newest row per sample identity (input order of the survivors kept)."""
    if table.num_rows == 0:
        return table
    positioned = _with_position(table, "")
    return table.filter(_winner_mask(positioned, _NEWEST_FIRST))


def append_to_index(
    storage: Storage, table: pa.Table, part_name: str, *, reconcile: bool = True
) -> ReconcileReport | None:
    """Add sample rows to dest's index as part `part_name`, then (by default) reconcile.

    `storage` is the dest root. Rows must follow SAMPLES_SCHEMA (build them with
    `samples_table`); duplicates inside `table` are reduced to the newest first. Writing an
    existing part name replaces that part (idempotent task retries). Pass `reconcile=False` from
    concurrent writers and call `reconcile_index` once afterwards (see the module docstring).
    """
    key = part_key(part_name)
    table = _conform(table, f"rows for part {part_name!r}")
    write_parquet(storage, key, _latest(table))
    return reconcile_index(storage) if reconcile else None


def _conform(table: pa.Table, what: str) -> pa.Table:
    """`table` cast to SAMPLES_SCHEMA (column order, metadata), or a clear ManifestError.

    Parts written by an older schema version get the newer columns with their implied values.
    """
    for name, value in _ADDED_COLUMNS.items():
        if name not in table.column_names:
            field = SAMPLES_SCHEMA.field(name)
            table = table.append_column(field, pa.array([value] * table.num_rows, field.type))
    missing = [n for n in SAMPLES_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ManifestError(f"{what} lack column(s) {missing}: build them with samples_table()")
    try:
        return table.select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise ManifestError(f"{what} do not match SAMPLES_SCHEMA: {exc}") from exc


def _load_index(
    storage: Storage, columns: Sequence[str] | None = None
) -> tuple[list[str], pa.Table | None]:
    """(part keys, all their rows with `_part`/`_row` position columns), None when empty.

    With `columns` only those are read (reconcile needs the key columns only); without, each
    part is conformed to SAMPLES_SCHEMA so parts from older builds concatenate.
    """
    keys, tables = [], []
    for key in _index_parts(storage):
        try:
            part = _read_parquet(storage, key, columns)
        except StorageNotFoundError:
            continue  # deleted by another writer since listing
        if columns is None:
            part = _conform(part, f"index part {key}")
        keys.append(key)
        tables.append(_with_position(part, key))
    if not tables:
        return keys, None
    return keys, pa.concat_tables(tables, promote_options="permissive")


def reconcile_index(storage: Storage) -> ReconcileReport:
    """Remove superseded rows from the index folder so each sample appears exactly once.

    Reads only the key columns of every part; rewrites (atomically) only parts that hold a
    superseded row and deletes parts left empty.
    """
    keys, rows = _load_index(storage, [*KEY_COLUMNS, "created_at", "run_id"])
    if rows is None:
        return ReconcileReport(0, 0, 0, (), ())
    keep = _winner_mask(rows, _NEWEST_FIRST)
    losers = rows.filter(pc.invert(keep))
    rewritten: list[str] = []
    deleted: list[str] = []
    for part in sorted(set(losers.column("_part").to_pylist())):
        # Rows of one part are contiguous and in file order, so its slice of `keep` is its mask.
        part_keep = keep.filter(pc.equal(rows.column("_part"), part).combine_chunks())
        if not pc.any(part_keep).as_py():
            storage.delete(part)
            deleted.append(part)
            continue
        full = _conform(_read_parquet(storage, part), f"index part {part}")
        write_parquet(storage, part, full.filter(part_keep))
        rewritten.append(part)
    return ReconcileReport(
        parts=len(keys) - len(deleted),
        rows=rows.num_rows - losers.num_rows,
        removed_rows=losers.num_rows,
        rewritten_parts=tuple(rewritten),
        deleted_parts=tuple(deleted),
    )


def read_index(storage: Storage) -> pa.Table:
    """Every sample dest holds: the newest row per (input_key, sample_index), sorted by them.

    Applies newest-wins itself, so it is duplicate-free even while a reconcile is pending.
    """
    _, rows = _load_index(storage)
    if rows is None:
        return SAMPLES_SCHEMA.empty_table()
    return _newest_sorted(rows)


def _newest_sorted(rows: pa.Table) -> pa.Table:
    latest = rows.filter(_winner_mask(rows, _NEWEST_FIRST))
    latest = latest.sort_by([(k, "ascending") for k in KEY_COLUMNS])
    return latest.drop_columns(["_part", "_row"]).replace_schema_metadata(SAMPLES_SCHEMA.metadata)


def compact_index(storage: Storage, part_name: str | None = None) -> ReconcileReport:
    """Rewrite the whole index as one part (newest row per sample), then delete the others.

    The compacted part is written before anything is deleted, so a crash leaves duplicates
    (hidden by `read_index`, removed by the next reconcile), never missing rows.
    """
    keys, rows = _load_index(storage)
    if rows is None:
        return ReconcileReport(0, 0, 0, (), ())
    latest = _newest_sorted(rows)
    name = part_name or f"compacted-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
    target = part_key(name)
    write_parquet(storage, target, latest)
    deleted = [key for key in keys if key != target]
    for key in deleted:
        storage.delete(key)
    return ReconcileReport(
        parts=1,
        rows=latest.num_rows,
        removed_rows=rows.num_rows - latest.num_rows,
        rewritten_parts=(target,),
        deleted_parts=tuple(deleted),
    )


# ---------------------------------------------------------------------------------------------
# Row building: what one input's restoration (or failure) becomes in the manifests


@dataclass(frozen=True)
class RowContext:
    """What every samples row of one batch shares."""

    run_id: str
    generator_id: str
    generator_checksum: str
    eps: float
    device: str
    created_at: datetime


@dataclass(frozen=True)
class InputRecord:
    """How an input became the LR image that was searched (the provenance columns)."""

    key: str
    checksum: str
    lr_size: int
    factor: int
    fit_policy: str
    fit_box: tuple[int, int, int, int] | None  # region of the input used; None = whole image
    conversions: tuple[str, ...]


def failed_rows(
    ctx: RowContext, input_key: str, reason: str, samples: int, checksum: str | None = None
) -> list[dict[str, Any]]:
    """One "failed" row per expected sample, so the index shows the input as not done."""
    return [
        {
            **_context_columns(ctx),
            "input_key": input_key,
            "input_checksum": checksum,
            "seed": 0,
            "sample_index": k,
            "method": "restart",
            "converged": False,
            "status": "failed",
            "error": reason,
        }
        for k in range(samples)
    ]


def sample_rows(
    ctx: RowContext,
    record: InputRecord,
    attempts: Sequence[Any],  # pulse_core.restore.SampleResult, selected first
    outputs: Mapping[int, tuple[str, str]],  # sample index -> (HR key, LR check key)
) -> list[dict[str, Any]]:
    """One row per attempt; extra (unselected) restarts get a row without output keys."""
    common = {
        **_context_columns(ctx),
        "input_key": record.key,
        "input_checksum": record.checksum,
        "lr_width": record.lr_size,
        "lr_height": record.lr_size,
        "factor": record.factor,
        "fit_policy": record.fit_policy,
        "fit_box": record.fit_box,
        "conversions": list(record.conversions),
    }
    rows = []
    for s in attempts:
        hr_key, lr_key = outputs.get(s.index, (None, None)) if s.selected else (None, None)
        rows.append(
            {
                **common,
                "seed": s.seed,
                "sample_index": s.index,
                "method": s.method,
                "parent_sample": s.parent,
                "attempt": s.attempt,
                "selected": s.selected,
                "intermediate_layers": list(s.intermediate_layers),
                "intermediate_radius": s.intermediate_radius,
                "steps_run": s.steps_run,
                "best_step": s.best_step,
                "final_l2": s.mse,
                "final_geocross": s.terms.get("GEOCROSS"),
                "final_total": s.terms.get("TOTAL"),
                "converged": s.converged,
                "output_key": hr_key,
                "lr_check_key": lr_key,
                "seconds": s.seconds,
                "status": "ok",
                "error": None,
            }
        )
    return rows


def loss_rows(run_id: str, input_key: str, attempts: Sequence[Any]) -> list[dict[str, Any]]:
    """The per-step history of every attempt of one input."""
    rows = []
    for s in attempts:
        h = s.history
        for step in range(s.steps_run):
            rows.append(
                {
                    "run_id": run_id,
                    "input_key": input_key,
                    "sample_index": s.index,
                    "step": step,
                    "lr": h["lr"][step],
                    "l2": h["MSE"][step],
                    "l1": h["L1"][step] if "L1" in h else None,
                    "geocross": h["GEOCROSS"][step] if "GEOCROSS" in h else None,
                    "total": h["TOTAL"][step],
                }
            )
    return rows


def _context_columns(ctx: RowContext) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "generator_id": ctx.generator_id,
        "generator_checksum": ctx.generator_checksum,
        "eps": ctx.eps,
        "device": ctx.device,
        "created_at": ctx.created_at,
    }


# ---------------------------------------------------------------------------------------------
# A run's parts -> its manifests


def part_manifest_key(run_id: str, kind: str, batch_id: str) -> str:
    """Where one batch writes its share of a run's manifest before finalisation."""
    return f"{RUNS_PREFIX}/{run_id}/parts/{kind}-{batch_id}.parquet"


def write_batch_manifests(
    dest: Storage, run_id: str, batch_id: str, samples: pa.Table, losses: pa.Table
) -> None:
    """A batch's parts, then its index part (no reconcile: the run reconciles once at the end).

    Part keys derive from (run, batch), so a retried batch overwrites rather than duplicates.
    """
    write_parquet(dest, part_manifest_key(run_id, "samples", batch_id), samples)
    write_parquet(dest, part_manifest_key(run_id, "losses", batch_id), losses)
    append_to_index(dest, samples, f"{run_id}-{batch_id}", reconcile=False)


@dataclass
class RunFiles:
    samples_key: str
    losses_key: str
    samples_rows: int
    losses_rows: int


def finalize_run(dest: Storage, run_id: str) -> RunFiles:
    """Merge the run's batch parts into `samples.parquet` / `losses.parquet`; reconcile the index.

    Parts are deleted only after both merged files are written, so a crash here loses nothing
    and running it again finishes the job.
    """
    prefix = f"{RUNS_PREFIX}/{run_id}/parts/"
    parts = sorted(o.key for o in dest.list(prefix=prefix, suffixes=(".parquet",)))
    merged: dict[str, pa.Table] = {}
    for kind, make in (("samples", samples_table), ("losses", losses_table)):
        tables = [read_manifest(dest, k) for k in parts if k[len(prefix) :].startswith(f"{kind}-")]
        table = pa.concat_tables(tables) if tables else make([])
        write_parquet(dest, run_manifest_key(run_id, kind), table)
        merged[kind] = table
    for key in parts:
        dest.delete(key)
    reconcile_index(dest)
    return RunFiles(
        samples_key=run_manifest_key(run_id, "samples"),
        losses_key=run_manifest_key(run_id, "losses"),
        samples_rows=merged["samples"].num_rows,
        losses_rows=merged["losses"].num_rows,
    )
