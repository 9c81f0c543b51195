"""Manifests: the Parquet record of what a run produced (Arrow schemas declared once, here).

Two tables, both versioned (`SCHEMA_VERSION`, also stored in the schema metadata under
`pulse.schema_version`, so a reader can tell a file from an older or newer build):
- samples: one row per (input, face, sample): where it came from, how it was made, how well it
  fits and where its PNG lies; failed inputs get a row with status "failed" and the error
  message; a whole photo in which the faces stage found no face gets one row with status
  "no-faces" and the reason (it is done, not failed: the next run does not redo it).
- losses: one row per (input, face, sample, step): the optimisation history.

A row's identity is (input_key, face_index, sample_index) (`KEY_COLUMNS`; losses add `step`).
`face_index` is None for an input restored whole (an LR face crop, the only kind before schema
version 3) and 0, 1, ... for the faces the faces stage found in a whole photo, numbered in the
detector's order (left to right). Parts and run manifests written by version 2 are upgraded on
read: their face columns are null, so their identities are unchanged.

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

The index rule: an input is the unit of replacement. Per `input_key` the index holds the rows
of ONE writer (run id + part): the newest one that restored the input (has "ok" rows); an input
no run ever restored keeps its newest failed rows. "Newest" orders by (created_at, run_id, part
name); inside the winner, one row per sample_index. So a redo with fewer samples leaves no row of
the older run for that input (not even its unselected restarts), and the index never mixes runs
for one input. A newer *failure* never displaces an earlier success: a flaky redo (a GPU out of
memory, a storage hiccup) must not make dest forget good samples whose PNGs are still there; the
failure is recorded in that run's own manifest (`_runs/<id>/samples.parquet`).

Statuses "ok" and "no-faces" both mean the input was handled (`DONE_STATUSES`): a writer with
either beats a writer that failed the input.

Guarantee: after `append_to_index` (reconcile on, the default) or `reconcile_index` returns, the
raw folder holds exactly what the rule keeps, so a plain dataset read has no stale or duplicate
rows. Reconciling reads only `RULE_COLUMNS` of every part and rewrites (atomically) just the
parts holding superseded rows, deleting parts left empty. A run adding new inputs rewrites nothing.

Why this order of steps: the new part is written first and older parts are trimmed after it.
A crash in between leaves superseded rows (never a lost row), which `read_index` already hides
(it applies the same rule) and the next reconcile removes. Trimming first could lose the only
copy of a row. Winning rows are never removed (a rewritten part keeps its name), so an
interrupted reconcile picks the same winners when it runs again.

Writers: writing the same part name again replaces that part, so a retried task is idempotent.
Reconciling is read-modify-write without locks (S3 has no rename and no cheap lock), so run it
from one writer at a time: concurrent batch tasks of one run append with `reconcile=False`, and
the flow calls `reconcile_index` (or `compact_index`) once when they are done. A lost race only
ever leaves duplicates that `read_index` hides and the next reconcile removes.

`compact_index` rewrites the whole index into one part (fewer, larger files for readers), by
the same rule.

Finalisation (`finalize_run`) merges a run's batch parts into its run manifests as a union with
what they already hold, then reconciles, then deletes the parts: it may fail at any step and be
run again. `adopt_leftovers` finalises the runs a crash left behind.

Bump `SCHEMA_VERSION` on any incompatible change and let compaction migrate.
"""

from __future__ import annotations

import io
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pulse_core.errors import PulseError
from pulse_core.storage import LocalStorage, Storage, StorageNotFoundError

SCHEMA_VERSION = 4  # 2 added attempt, selected, intermediate_layers, intermediate_radius;
# 3 added the face columns (face_index, face_box, face_landmarks, face_score, face_recipe,
# photo_output_key, upscale) and the "no-faces" status; losses got face_index;
# 4 added how the search ran: search_batch, precision, checkpoint (samples only)
RUNS_PREFIX = "_runs"  # dest/_runs/<run id>/{samples,losses}.parquet
INDEX_PREFIX = "_manifest/samples"  # dest/_manifest/samples/part-<name>.parquet
METHODS = ("restart", "noise-resample")
STATUSES = ("ok", "failed", "no-faces")
DONE_STATUSES = ("ok", "no-faces")  # the input was handled: nothing left to redo
KEY_COLUMNS = ("input_key", "face_index", "sample_index")  # a sample's identity in the index
LANDMARK_VALUES = 10  # face_landmarks: 5 (x, y) points, flattened
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

FACE_BOX_TYPE = pa.struct(
    [
        pa.field("x0", pa.float32(), nullable=False),  # photo pixel coordinates, continuous:
        pa.field("y0", pa.float32(), nullable=False),  # pixel (i, j) covers [i, i+1) x [j, j+1)
        pa.field("x1", pa.float32(), nullable=False),
        pa.field("y1", pa.float32(), nullable=False),
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
        pa.field("face_index", pa.int32()),  # face k of a whole photo; None = a whole input
        pa.field("face_box", FACE_BOX_TYPE),  # the detector's box, photo px; None = whole input
        pa.field("face_landmarks", pa.list_(pa.float32())),  # x0, y0, ..., x4, y4 in photo px:
        # eyes (the photo's left first), nose, mouth corners; None = whole input
        pa.field("face_score", pa.float32()),  # detector's face probability
        pa.field("face_recipe", pa.string()),  # alignment: "ffhq" | "digiface"
        pa.field("photo_output_key", pa.string()),  # the photo with faces pasted (faces=paste)
        pa.field("upscale", pa.int32()),  # its enlargement of the photo
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
        pa.field("search_batch", pa.int32()),  # rows of the search that made it (auto or set,
        # after any out-of-memory halving); None = failed input or written before version 4
        pa.field("precision", pa.string()),  # synthesis precision "fp32" | "bf16" | "fp16"
        pa.field("checkpoint", pa.bool_()),  # activation checkpointing of the synthesis used
        pa.field("status", pa.string(), nullable=False),  # "ok" | "failed" | "no-faces"
        pa.field("error", pa.string()),  # what went wrong ("failed") or why there is nothing to
        # restore ("no-faces"); required for both
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata=_metadata("samples"),
)

LOSSES_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("input_key", pa.string(), nullable=False),
        pa.field("face_index", pa.int32()),  # as in samples: None = a whole input
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
    # version 3: rows before it were whole inputs, never faces of a photo
    "face_index": None,
    "face_box": None,
    "face_landmarks": None,
    "face_score": None,
    "face_recipe": None,
    "photo_output_key": None,
    "upscale": None,
    # version 4: not recorded before it (the search ran fp32, plain, at settings.search_batch)
    "search_batch": None,
    "precision": None,
    "checkpoint": None,
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


def _face_box(value: Any) -> Any:
    """Accept an (x0, y0, x1, y1) tuple as well as a dict."""
    if value is None or isinstance(value, Mapping):
        return value
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ManifestError(f"face_box must be (x0, y0, x1, y1) or a dict, not {value!r}") from None
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1}


def _face_landmarks(value: Any, i: int) -> list[float]:
    """5 (x, y) points, as a (5, 2) array or 10 numbers, -> a flat list of 10 floats."""
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    if flat.size != LANDMARK_VALUES or not np.isfinite(flat).all():
        raise ManifestError(
            f"samples row {i}: face_landmarks must be 5 finite (x, y) points, got {value!r}"
        )
    return flat.tolist()


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
        if row["status"] == "no-faces" and not row.get("error"):
            raise ManifestError(f"samples row {i}: a no-faces row needs its reason (in error)")
        if "fit_box" in row:
            row["fit_box"] = _fit_box(row["fit_box"])
        if "face_box" in row:
            row["face_box"] = _face_box(row["face_box"])
        if row.get("face_landmarks") is not None:
            row["face_landmarks"] = _face_landmarks(row["face_landmarks"], i)
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
        file = pq.ParquetFile(pa.BufferReader(data))
        if columns is not None:
            # Only the columns the file has: an older part lacks the ones added since, and the
            # caller fills them in with their implied values (`_conform_columns`).
            present = set(file.schema_arrow.names)
            columns = [c for c in columns if c in present]
        table = file.read(columns=list(columns) if columns is not None else None)
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


def _winner_mask(
    table: pa.Table, order: Sequence[tuple[str, str]], keys: Sequence[str] = KEY_COLUMNS
) -> pa.Array:
    """Boolean mask (in row order) of the row that comes first in each `keys` group by `order`.

    Sorts once by the keys then by `order` and keeps the first row of each key run; vectorised
    so an index of millions of rows reconciles in about a second.
    """
    n = table.num_rows
    if n == 0:
        return pa.array([], type=pa.bool_())
    sort_keys = [(k, "ascending") for k in keys] + list(order)
    indices = pc.sort_indices(table, sort_keys=sort_keys)
    sorted_keys = table.select(list(keys)).take(indices)
    first = pa.array([True])
    if n > 1:
        changed = None
        for column in keys:
            col = sorted_keys.column(column).combine_chunks()
            diff = _differs(col.slice(1), col.slice(0, n - 1))
            changed = diff if changed is None else pc.or_(changed, diff)
        first = pa.concat_arrays([first, changed])
    keep = pc.array_take(first, pc.sort_indices(indices))  # back to the original row order
    return keep


def _differs(a: pa.Array, b: pa.Array) -> pa.Array:
    """a != b element-wise, with null equal to null (face_index is None for whole inputs)."""
    diff = pc.not_equal(a, b)
    if not a.null_count and not b.null_count:
        return diff
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.if_else(both_null, False, pc.fill_null(diff, True))


_NEWEST_FIRST = [
    ("created_at", "descending"),
    ("run_id", "descending"),
    ("_part", "descending"),
    ("_row", "descending"),
]
# What the per-input rule reads: the sample identity, who wrote the row, when, and whether the
# input was restored. Reconciling reads only these columns of every part.
RULE_COLUMNS = ("input_key", "face_index", "sample_index", "status", "created_at", "run_id")
_WRITER = ("input_key", "run_id", "_part")  # one batch of one run's rows for one input
_WRITER_RANK = [
    ("_ok", "descending"),  # handled the input (ok or no-faces): beats any writer that failed it
    ("_newest", "descending"),  # then the newest batch
    ("run_id", "descending"),  # then fixed tie-breaks, so every reader picks the same writer
    ("_part", "descending"),
]


def _with_position(table: pa.Table, part: str) -> pa.Table:
    table = table.append_column("_part", pa.array([part] * table.num_rows, pa.string()))
    return table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _keep_mask(rows: pa.Table) -> pa.Array:
    """Mask (in row order) of the rows the index keeps: per input, the rows of ONE writer.

    `rows` has `RULE_COLUMNS` plus the `_part`/`_row` position columns. A writer is the
    (run_id, part) that wrote an input's rows. Per input_key the winner is the newest writer with
    an "ok" or "no-faces" row; a writer without one (the input failed there) wins only when no
    writer handled the input. Inside the winner, one row per (face_index, sample_index) (newest
    first), in case a part holds repeats. Vectorised (group-by, join, sorts): no Python loop.
    """
    n = rows.num_rows
    if n == 0:
        return pa.array([], type=pa.bool_())
    position = pa.array(np.arange(n, dtype=np.int64))
    writers = pa.table(
        {
            "input_key": rows.column("input_key"),
            "run_id": rows.column("run_id"),
            "_part": rows.column("_part"),
            "ok": pc.is_in(rows.column("status"), value_set=pa.array(DONE_STATUSES)),
            "created_at": rows.column("created_at"),
        }
    )
    ranked = writers.group_by(list(_WRITER), use_threads=False).aggregate(
        [("ok", "any"), ("created_at", "max")]
    )
    ranked = ranked.rename_columns({"ok_any": "_ok", "created_at_max": "_newest"})
    best = ranked.filter(_winner_mask(ranked, _WRITER_RANK, keys=("input_key",)))
    chosen = (
        writers.select(list(_WRITER))
        .append_column("_i", position)
        .join(best.select(list(_WRITER)), keys=list(_WRITER), join_type="inner")
    )
    in_winner = pc.is_in(position, value_set=chosen.column("_i").combine_chunks())
    inside = (
        rows.select([*KEY_COLUMNS, "created_at", "run_id", "_part", "_row"])
        .append_column("_i", position)
        .filter(in_winner)
    )
    unique = inside.column("_i").filter(_winner_mask(inside, _NEWEST_FIRST)).combine_chunks()
    return pc.is_in(position, value_set=unique)


def _latest(table: pa.Table) -> pa.Table:
    """`table` reduced by the index rule (one writer per input; input order of survivors kept)."""
    if table.num_rows == 0:
        return table
    return table.filter(_keep_mask(_with_position(table, "")))


def append_to_index(
    storage: Storage, table: pa.Table, part_name: str, *, reconcile: bool = True
) -> ReconcileReport | None:
    """Add sample rows to dest's index as part `part_name`, then (by default) reconcile.

    `storage` is the dest root. Rows must follow SAMPLES_SCHEMA (build them with
    `samples_table`); the table is first reduced by the index rule itself. Writing an existing
    part name replaces that part (idempotent task retries). Pass `reconcile=False` from
    concurrent writers and call `reconcile_index` once afterwards (see the module docstring).
    """
    key = part_key(part_name)
    table = _conform(table, f"rows for part {part_name!r}")
    write_parquet(storage, key, _latest(table))
    return reconcile_index(storage) if reconcile else None


def _conform(table: pa.Table, what: str) -> pa.Table:
    """`table` cast to SAMPLES_SCHEMA (column order, metadata), or a clear ManifestError."""
    return _conform_columns(table, SAMPLES_SCHEMA.names, what)


def _samples_subschema(columns: Sequence[str]) -> pa.Schema:
    return pa.schema([SAMPLES_SCHEMA.field(n) for n in columns], metadata=SAMPLES_SCHEMA.metadata)


def _conform_columns(table: pa.Table, columns: Sequence[str], what: str) -> pa.Table:
    """`table`'s `columns`, cast to their SAMPLES_SCHEMA types, or a clear ManifestError.

    Parts written by an older schema version get the newer columns with their implied values.
    """
    for name in columns:
        if name in _ADDED_COLUMNS and name not in table.column_names:
            field = SAMPLES_SCHEMA.field(name)
            value = _ADDED_COLUMNS[name]
            table = table.append_column(field, pa.array([value] * table.num_rows, field.type))
    missing = [n for n in columns if n not in table.column_names]
    if missing:
        raise ManifestError(f"{what} lack column(s) {missing}: build them with samples_table()")
    try:
        return table.select(list(columns)).cast(_samples_subschema(columns))
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise ManifestError(f"{what} do not match SAMPLES_SCHEMA: {exc}") from exc


def _load_index(
    storage: Storage, columns: Sequence[str] | None = None
) -> tuple[list[str], pa.Table | None]:
    """(part keys, all their rows with `_part`/`_row` position columns), None when empty.

    With `columns` only those are read (reconcile needs `RULE_COLUMNS` only); without, every
    column. Either way each part is conformed to SAMPLES_SCHEMA so parts from older builds
    concatenate.
    """
    keys, tables = [], []
    for key in _index_parts(storage):
        try:
            part = _read_parquet(storage, key, columns)
        except StorageNotFoundError:
            continue  # deleted by another writer since listing
        part = _conform_columns(part, columns or SAMPLES_SCHEMA.names, f"index part {key}")
        keys.append(key)
        tables.append(_with_position(part, key))
    if not tables:
        return keys, None
    return keys, pa.concat_tables(tables, promote_options="permissive")


def reconcile_index(storage: Storage) -> ReconcileReport:
    """Trim the index folder to the rule: per input, the rows of one run (see module docstring).

    Reads only `RULE_COLUMNS` of every part; rewrites (atomically) only parts that hold a
    superseded row and deletes parts left empty. The winning rows are never touched, so a crash
    part-way leaves only losers behind: the next reconcile picks the same winners and finishes.
    """
    keys, rows = _load_index(storage, RULE_COLUMNS)
    if rows is None:
        return ReconcileReport(0, 0, 0, (), ())
    keep = _keep_mask(rows)
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
        if full.num_rows != len(part_keep):
            continue  # replaced since (a retried batch): leave it to the next reconcile
        write_parquet(storage, part, full.filter(part_keep))
        rewritten.append(part)
    return ReconcileReport(
        parts=len(keys) - len(deleted),
        rows=rows.num_rows - losers.num_rows,
        removed_rows=losers.num_rows,
        rewritten_parts=tuple(rewritten),
        deleted_parts=tuple(deleted),
    )


def read_index(storage: Storage, columns: Sequence[str] | None = None) -> pa.Table:
    """What dest holds now: per input, the rows of its winning run, sorted by input and sample.

    Applies the index rule itself, so the answer is right even while a reconcile is pending.
    `columns`: return only these (SAMPLES_SCHEMA names, in this order); only they and
    `RULE_COLUMNS` are read from the parts, so a caller wanting three columns of a large index
    does not pay for thirty. None = every column.
    """
    wanted = list(SAMPLES_SCHEMA.names if columns is None else dict.fromkeys(columns))
    unknown = [c for c in wanted if c not in SAMPLES_SCHEMA.names]
    if unknown:
        raise ManifestError(f"the index has no column(s) {unknown}; it has {SAMPLES_SCHEMA.names}")
    read = None if columns is None else list(dict.fromkeys([*wanted, *RULE_COLUMNS]))
    _, rows = _load_index(storage, read)
    if rows is None:
        return _samples_subschema(wanted).empty_table()
    return _current(rows).select(wanted)


def _current(rows: pa.Table) -> pa.Table:
    """The rows the index rule keeps, sorted by sample identity, position columns dropped."""
    kept = rows.filter(_keep_mask(rows))
    kept = kept.sort_by([(k, "ascending") for k in KEY_COLUMNS])
    return kept.drop_columns(["_part", "_row"]).replace_schema_metadata(SAMPLES_SCHEMA.metadata)


def compact_index(storage: Storage, part_name: str | None = None) -> ReconcileReport:
    """Rewrite the whole index as one part (the rows the index rule keeps), then delete the rest.

    The compacted part is written before anything is deleted, so a crash leaves copies (hidden
    by `read_index`, removed by the next reconcile), never missing rows.
    """
    keys, rows = _load_index(storage)
    if rows is None:
        return ReconcileReport(0, 0, 0, (), ())
    latest = _current(rows)
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
class FaceRecord:
    """Where one face of a whole photo was, and how it was framed (the face columns)."""

    index: int  # k: the face's position in the detector's list (left to right)
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), photo pixel coordinates
    landmarks: tuple[float, ...]  # 10 values: 5 (x, y) points in photo pixel coordinates
    score: float  # the detector's face probability
    recipe: str  # "ffhq" | "digiface"


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
    face: FaceRecord | None = None  # None: the input was searched whole
    photo_output_key: str | None = None  # faces=paste: the photo with the faces pasted back
    upscale: int | None = None  # its enlargement


def _face_columns(face: FaceRecord | None) -> dict[str, Any]:
    if face is None:
        return {}
    return {
        "face_index": face.index,
        "face_box": face.box,
        "face_landmarks": list(face.landmarks),
        "face_score": face.score,
        "face_recipe": face.recipe,
    }


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


def no_faces_rows(
    ctx: RowContext,
    input_key: str,
    reason: str,
    checksum: str,
    conversions: Sequence[str] = (),
    *,
    photo_output_key: str | None = None,
    upscale: int | None = None,
) -> list[dict[str, Any]]:
    """The one row of a photo in which the faces stage found no face: done, with the reason.

    One row (sample 0, face_index None) rather than one per sample: there is nothing per sample
    to record, and its status alone makes discovery count the photo as done.
    """
    return [
        {
            **_context_columns(ctx),
            "input_key": input_key,
            "input_checksum": checksum,
            "conversions": list(conversions),
            "seed": 0,
            "sample_index": 0,
            "method": "restart",
            "converged": False,
            "photo_output_key": photo_output_key,
            "upscale": upscale,
            "status": "no-faces",
            "error": reason,
        }
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
        **_face_columns(record.face),
        "photo_output_key": record.photo_output_key,
        "upscale": record.upscale,
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
                "search_batch": getattr(s, "search_batch", None),
                "precision": getattr(s, "precision", None),
                "checkpoint": getattr(s, "checkpoint", None),
                "status": "ok",
                "error": None,
            }
        )
    return rows


def loss_rows(
    run_id: str, input_key: str, attempts: Sequence[Any], face_index: int | None = None
) -> list[dict[str, Any]]:
    """The per-step history of every attempt of one input (or of one face of a photo)."""
    rows = []
    for s in attempts:
        h = s.history
        for step in range(s.steps_run):
            rows.append(
                {
                    "run_id": run_id,
                    "input_key": input_key,
                    "face_index": face_index,
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

    Safe to fail at any step and run again (a retry, or a later run adopting a crashed one):
    1. each run manifest becomes what it already holds UNION the parts left, one row per row
       identity (a part's row wins), so a retry after some parts were deleted keeps their rows;
    2. the index is reconciled (itself restartable);
    3. only then are the parts deleted.
    No step removes the only copy of a row, and none can add a row twice.
    """
    parts = _run_parts(dest, run_id)
    counts = _merge_run_parts(dest, run_id, parts)
    reconcile_index(dest)
    for key in parts:
        dest.delete(key)
    return RunFiles(
        samples_key=run_manifest_key(run_id, "samples"),
        losses_key=run_manifest_key(run_id, "losses"),
        samples_rows=counts["samples"],
        losses_rows=counts["losses"],
    )


# A row's identity in a run manifest: the merge keeps one row per identity.
RUN_ROW_IDENTITY: dict[str, tuple[str, ...]] = {
    "samples": KEY_COLUMNS,
    "losses": ("input_key", "face_index", "sample_index", "step"),
}


def _run_parts(dest: Storage, run_id: str) -> list[str]:
    """The run's batch part keys, sorted (a bad run id is refused before anything is listed)."""
    run_manifest_key(run_id, "samples")
    prefix = f"{RUNS_PREFIX}/{run_id}/parts/"
    return sorted(o.key for o in dest.list(prefix=prefix, suffixes=(".parquet",)))


def _merge_run_parts(dest: Storage, run_id: str, parts: Sequence[str]) -> dict[str, int]:
    """Write each run manifest as (its current rows UNION the parts); return the row counts.

    Without parts the manifest is left as it is (a retry after the parts were deleted), or
    written empty when it does not exist yet (a run that attempted nothing still has a record).
    """
    prefix = f"{RUNS_PREFIX}/{run_id}/parts/"
    counts: dict[str, int] = {}
    for kind in ("samples", "losses"):
        key = run_manifest_key(run_id, kind)
        try:
            existing: pa.Table | None = read_manifest(dest, key)
        except StorageNotFoundError:
            existing = None
        mine = [k for k in parts if k[len(prefix) :].startswith(f"{kind}-")]
        if existing is not None and not mine:
            counts[kind] = existing.num_rows
            continue
        tables = [existing] if existing is not None else []
        tables += [read_manifest(dest, k) for k in mine]
        merged = _union_rows(tables, kind)
        write_parquet(dest, key, merged)
        counts[kind] = merged.num_rows
    return counts


def _union_rows(tables: Sequence[pa.Table], kind: str) -> pa.Table:
    """`tables` concatenated, one row per `RUN_ROW_IDENTITY[kind]`: the last table's row wins.

    Vectorised (one sort of the identity columns; 2 million loss rows take about 0.2 s), since
    a run's losses can hold millions of rows. Survivors keep their order.
    """
    schema = SAMPLES_SCHEMA if kind == "samples" else LOSSES_SCHEMA
    conformed = [_conform_to(t, schema, f"{kind} manifest rows") for t in tables]
    if not conformed:
        return schema.empty_table()
    table = pa.concat_tables(conformed)
    identity = RUN_ROW_IDENTITY[kind]
    keys = table.select(list(identity)).append_column(
        "_pos", pa.array(np.arange(table.num_rows, dtype=np.int64))
    )
    return table.filter(_winner_mask(keys, [("_pos", "descending")], keys=identity))


def _conform_to(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    if schema is SAMPLES_SCHEMA:
        return _conform(table, what)
    if "face_index" not in table.column_names:  # losses of version 2: whole inputs only
        table = table.append_column(
            schema.field("face_index"), pa.nulls(table.num_rows, pa.int32())
        )
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise ManifestError(
            f"{what} do not match the {schema.metadata[b'pulse.schema']!r} schema: {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# What a crash leaves: adopted by the next run


@dataclass(frozen=True)
class AdoptReport:
    """What `adopt_leftovers` did (for logs and Prefect artifacts)."""

    adopted_runs: tuple[str, ...]  # runs whose parts were merged into their run manifests
    waiting_runs: tuple[str, ...]  # runs with a part newer than `older_than`: maybe alive, left
    failed_runs: tuple[tuple[str, str], ...]  # (run id, why) could not be adopted now; next time
    removed_temp_files: tuple[str, ...]  # keys of stale `.pulse-tmp-*` files deleted (local)
    reconcile: ReconcileReport | None  # the index reconcile after adopting; None: none adopted


def adopt_leftovers(
    dest: Storage,
    *,
    current_run_id: str,
    older_than: timedelta,
    now: datetime | None = None,
    live_runs: Collection[str] = (),
) -> AdoptReport:
    """Finish what crashed or failed runs left in dest: their parts and stale temp files.

    A run whose newest part under `_runs/<id>/parts/` is older than `older_than` (by the
    storage's mtime) is finalised: its parts are merged into its run manifest, so every index
    row's run id has one, and the parts are deleted. A younger part may belong to a run still
    writing, so that run is left alone (finalising it anyway would be safe, since merging is a
    union, but would race its own reconcile). `current_run_id` and `live_runs` (runs whose
    lease says they are alive: `pulse_core.lease`) are never touched.

    On a local dest, `.pulse-tmp-*` files (atomic writes a kill -9 interrupted; hidden from
    `Storage.list`) older than `older_than` are deleted too. S3 has no such leftovers: a PUT is
    atomic, and an interrupted multipart upload is never visible (a bucket lifecycle rule
    `AbortIncompleteMultipartUpload` reclaims its space).

    Safe to run at any time and twice: everything it does is finalisation, which is idempotent.
    `now`: the reference clock (tests); None = the current UTC time.
    """
    now = now or datetime.now(UTC)
    newest: dict[str, datetime] = {}
    for info in dest.list(prefix=f"{RUNS_PREFIX}/", suffixes=(".parquet",)):
        segments = info.key.split("/")
        if len(segments) != 4 or segments[2] != "parts" or segments[1] == current_run_id:
            continue
        if segments[1] in live_runs:
            continue
        mtime = info.mtime or now  # unknown age: treat as fresh, never adopt a live run
        run_id = segments[1]
        newest[run_id] = max(mtime, newest.get(run_id, mtime))
    due = sorted(r for r, t in newest.items() if now - t >= older_than)
    waiting = tuple(sorted(r for r in newest if r not in due))

    merged: dict[str, list[str]] = {}
    failed: list[tuple[str, str]] = []
    for run_id in due:
        try:
            parts = _run_parts(dest, run_id)
            _merge_run_parts(dest, run_id, parts)
        except PulseError as exc:  # a corrupt part must not block every other adoption
            failed.append((run_id, str(exc)))
            continue
        merged[run_id] = parts
    report = reconcile_index(dest) if merged else None
    for parts in merged.values():  # after the manifests and the reconcile, as in finalize_run
        for key in parts:
            dest.delete(key)

    removed: list[str] = []
    if isinstance(dest, LocalStorage):
        for temp in list(dest.stale_temp_files(older_than, now=now)):
            dest.delete(temp.key)
            removed.append(temp.key)
    return AdoptReport(
        adopted_runs=tuple(merged),
        waiting_runs=waiting,
        failed_runs=tuple(failed),
        removed_temp_files=tuple(removed),
        reconcile=report,
    )


def index_run_ids_without_manifest(dest: Storage) -> set[str]:
    """Run ids cited by rows in the index folder that have no `_runs/<id>/samples.parquet`.

    Empty after every run is finalised (or adopted); a run still going, or one whose parts are
    too young to adopt, shows up here until then. Reads only the run_id column of the index.
    """
    _, rows = _load_index(dest, ["run_id"])
    if rows is None:
        return set()
    cited = {str(r) for r in pc.unique(rows.column("run_id")).to_pylist()}
    have = set()
    for info in dest.list(prefix=f"{RUNS_PREFIX}/", suffixes=("/samples.parquet",)):
        segments = info.key.split("/")
        if len(segments) == 3 and segments[2] == "samples.parquet":
            have.add(segments[1])
    return cited - have


# ---------------------------------------------------------------------------------------------
# The index part by part: for readers that must not hold the whole index (discovery at scale)


def iter_index_parts(storage: Storage, columns: Sequence[str]) -> Iterator[tuple[str, pa.Table]]:
    """(part key, its `columns`) for each part of dest's index, one part in memory at a time.

    The rule is NOT applied: the caller streams raw rows and applies `index_keep_mask` itself
    to whatever it cannot decide alone. `pulse_core.pipeline.discover` reads a 4M-row index this
    way in bounded memory, where `read_index` would hold every row at once.
    """
    for key in _index_parts(storage):
        try:
            part = _read_parquet(storage, key, columns)
        except StorageNotFoundError:
            continue  # deleted by another writer since listing
        yield key, _conform_columns(part, columns, f"index part {key}")


def index_keep_mask(rows: pa.Table) -> pa.Array:
    """Mask of the rows the index rule keeps (see the module docstring), for streaming readers.

    `rows`: `RULE_COLUMNS`, `_part` (the part key) and `_row` (the row's position in its part).
    The rule is decided per input, so a caller may apply it to any set of whole inputs.
    """
    return _keep_mask(rows)
