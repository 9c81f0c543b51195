"""The one pipeline: discover -> (decode -> restore -> render -> record) per batch -> finalise.

`pulse upsample`, the Prefect flow's tasks and notebooks all run these functions, so an input
gives the same PNGs, contact sheet and manifest rows whichever entry point restored it. No
Prefect here: the flow wraps `discover`, `process_batch` and `finalize_run` one-to-one.

Bad input never fails a batch: it becomes manifest rows with status "failed" and the reason.
Only transient storage errors propagate, so the caller may retry the whole batch: outputs and
parts are written under derived keys and a retry overwrites rather than duplicates.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import socket
import statistics
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pulse_core.devices import pick_device
from pulse_core.errors import PulseError
from pulse_core.faces import AlignedFace, align_faces, detect_faces, load_mtcnn, paste_faces
from pulse_core.faces.photo import as_rgb_array
from pulse_core.generators.base import Generator
from pulse_core.generators.loading import load_counts, load_generator
from pulse_core.imaging import LoadedImage, PreparedInput, load_image, prepare_input
from pulse_core.manifest import (
    DONE_STATUSES,
    INDEX_PREFIX,
    RUNS_PREFIX,
    FaceRecord,
    InputRecord,
    RowContext,
    RunFiles,
    failed_rows,
    finalize_run,
    index_keep_mask,
    iter_index_parts,
    loss_rows,
    losses_table,
    no_faces_rows,
    read_manifest,
    sample_rows,
    samples_table,
    write_batch_manifests,
    write_parquet,
)
from pulse_core.render import (
    FACE_FOLDER,
    OUTPUT_NAME,
    output_base,
    remove_stale_outputs,
    sample_keys,
    write_outputs,
    write_photo,
    written_keys,
)
from pulse_core.restore import RestoreResult, restore_many
from pulse_core.settings import RestoreSettings
from pulse_core.storage import Storage, is_transient, validate_key

# One list of input suffixes for every entry point (a GIF's first frame is used, and recorded).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
RESERVED_PREFIXES = (RUNS_PREFIX + "/", INDEX_PREFIX.split("/")[0] + "/")

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, steps, converged (N,))


# ----------------------------------------------------------------------------
# Discover
#
# Sized for archives of millions of inputs (issue 9, "Scale"): nothing here holds a Python object
# per input or per index row. Listings are streamed into Arrow string arrays, the index is read
# part by part with only the columns discovery needs and reduced at once to small numpy arrays,
# and dest's PNGs are matched against the inputs' output folders in vectorised blocks. Measured
# (docs/benchmarks.md, "Discovery at archive scale"; 2 cores): a 1,000,000-key listing against a
# 4,000,000-row index and 8.9M PNGs in dest takes 24 s and 0.73 GiB peak RSS, 0.44 GiB above the
# process before it (torch imported). The earlier algorithm (a list of every key, the whole index
# as Python dicts, a set of every PNG in dest) took 56 s and 9.9 GiB for the same answer; its
# index step alone (`read_index`, every column) 22 s and 7.0 GiB, with 4 columns 7 s, 2.8 GiB.

LIST_CHUNK = 65_536  # listed keys turned into one Arrow array at a time (~5 MB of str objects)
MATCH_ROWS = 1_000_000  # keys matched against the listing at once: each match builds one hash
# table of the listing (0.3 s for 1M keys), so blocks of 1M rows keep a 4M-row index at 4 builds
# while a block (its keys, flags and that hash table) stays near 150 MB
INDEX_COLUMNS = (
    "input_key",
    "face_index",
    "sample_index",
    "status",
    "output_key",
    "created_at",
    "run_id",
)
# dest's HR sample PNGs: `<output folder>/sample-<k>.png`, k written without leading zeros; a
# face's output folder is `<photo's folder>/face-<i>`, so `base` is that folder for face samples
_SAMPLE_PNG = r"(?s)^(?P<base>.*)/sample-(?P<k>0|[1-9][0-9]{0,8})\.png$"


class KeyList(Sequence[str]):
    """Keys held in one Arrow string array instead of a list of `str`.

    A million 39-character keys take 45 MB here against 92 MB as a list of str (measured), in
    one buffer the garbage collector never walks. Indexing gives a `str` and slicing a
    `list[str]`, so code written for a list keeps working: `pending[i : i + size]` is a batch.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: pa.Array | pa.ChunkedArray | Iterable[str] = ()) -> None:
        if isinstance(keys, pa.ChunkedArray):
            keys = pa.concat_arrays(keys.chunks) if keys.num_chunks else pa.array([], keys.type)
        if not isinstance(keys, pa.Array):
            keys = pa.array(list(keys), pa.large_string())
        self._keys: pa.Array = keys.cast(pa.large_string())

    @property
    def arrow(self) -> pa.Array:
        """The keys as one Arrow `large_string` array (no copy)."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            picked = range(len(self._keys))[index]
            if picked.step == 1:
                return self._keys.slice(picked.start, len(picked)).to_pylist()
            return self._keys.take(pa.array(picked, pa.int64())).to_pylist()
        if not -len(self._keys) <= index < len(self._keys):
            raise IndexError(f"key index {index} out of range ({len(self._keys)} keys)")
        return self._keys[index].as_py()

    def __iter__(self) -> Iterator[str]:
        for batch in self.batches(LIST_CHUNK):
            yield from batch

    def batches(self, size: int) -> Iterator[list[str]]:
        """Consecutive lists of `size` keys (the last may be shorter): a plan's batches."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        for start in range(0, len(self._keys), size):
            yield self._keys.slice(start, size).to_pylist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyList):
            return self._keys.equals(other._keys)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking like a list: not hashable

    def __reduce__(self) -> tuple[type[KeyList], tuple[pa.Array]]:
        return KeyList, (self._keys,)

    def __repr__(self) -> str:
        head = self._keys.slice(0, 3).to_pylist()
        more = ", ..." if len(self._keys) > 3 else ""
        return f"KeyList({len(self._keys)} keys: {str(head)[1:-1]}{more})"


@dataclass
class Discovery:
    """What `discover` found: the pending input keys and what was skipped and why."""

    pending: KeyList  # sorted; `pending[i : i + n]` and `pending.batches(n)` give lists of str
    total: int  # images found in source
    done: int  # skipped: outputs and manifest rows already in dest
    collisions: dict[str, str] = field(default_factory=dict)  # input key -> key it collides with

    def __post_init__(self) -> None:
        if not isinstance(self.pending, KeyList):
            self.pending = KeyList(self.pending)


def discover(
    source: Storage,
    dest: Storage,
    samples: int,
    *,
    force: bool = False,
    limit: int | None = None,
) -> Discovery:
    """List images in source; skip those whose samples are all in dest's index and storage.

    An input counts as done when dest's index (as `read_index` resolves it) holds "ok" rows for
    its samples 0..samples-1 and their PNGs exist; for a whole photo of the faces stage, when
    every face in its rows has them (each face one (face_index) group), or when its row says
    "no-faces". Failed or partial inputs are pending again, so a re-run resumes. Whether an input
    is a photo is read from its rows, not from the settings: switching `faces` on for a dest
    restored without it redoes nothing unless `force`. `limit` keeps the first `limit` pending
    keys (list slicing semantics).

    Memory grows with the archive only through compact arrays: about 100 bytes per listed key
    (the key, its output folder, codes) and 31 per index row of a listed input, never a Python
    object per key or row (see the section comment for the measured numbers). Time is
    dominated by the two listings (source's keys, dest's PNGs).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    keys = listed_inputs(source, dest)
    bases = pc.dictionary_encode(_output_bases(keys))
    base_codes = bases.indices.to_numpy(zero_copy_only=False)
    collisions = _collisions(keys, base_codes)
    if force:
        done = np.zeros(len(keys), dtype=bool)
    else:
        done = _done_inputs(dest, keys, base_codes, bases.dictionary, samples)
    pending = keys.filter(pa.array(~done)) if done.any() else keys
    if limit is not None:
        picked = range(len(pending))[:limit]
        pending = pending.slice(picked.start, len(picked))
    return Discovery(
        pending=KeyList(pending), total=len(keys), done=int(done.sum()), collisions=collisions
    )


def find_collisions(keys: Sequence[str]) -> dict[str, str]:
    """Inputs whose output folder another input already maps to (`a.png` and `a.jpg`)."""
    collisions: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        base = output_base(key)
        if base in seen:
            collisions[key] = seen[base]
        else:
            seen[base] = key
    return collisions


def listed_inputs(source: Storage, dest: Storage) -> pa.Array:
    """Source's image keys, sorted, without dest's own outputs and manifests (one Arrow array).

    dest == source: manifests (`_runs/`, `_manifest/`) and the PNGs written in an input's output
    folder (`<stem>/sample-<k>.png`, `-lr.png`, `sheet.png`, `restored.png` next to
    `<stem>.<ext>`, and the same names in its faces' `<stem>/face-<i>/`) are not inputs. dest below source (`source/restored`): nothing under dest is an input. Without this,
    every re-run would take the previous run's outputs for new inputs.

    The listing is streamed: only kept keys are held, as Arrow arrays (the 9 PNGs a restored
    input leaves in a dest == source archive are dropped as they pass, see `_OutputFolders`). A
    storage that lists out of key order (S3 directory buckets do) is sorted afterwards and its
    outputs dropped by the same rule, vectorised.
    """
    src, dst = source.url.rstrip("/"), dest.url.rstrip("/")
    inside = dst[len(src) + 1 :] + "/" if dst.startswith(src + "/") else None
    same = dst == src
    outputs = _OutputFolders()
    chunks: list[pa.Array] = []
    buffer: list[str] = []
    previous, ordered = "", True
    for info in source.list(suffixes=IMAGE_SUFFIXES):
        key = info.key
        ordered = ordered and key >= previous
        previous = key
        if inside is not None and key.startswith(inside):
            continue
        if same and (key.startswith(RESERVED_PREFIXES) or outputs.holds(key)):
            continue
        buffer.append(key)
        if len(buffer) == LIST_CHUNK:
            chunks.append(pa.array(buffer, pa.large_string()))
            buffer = []
    if buffer:
        chunks.append(pa.array(buffer, pa.large_string()))
    keys = pa.concat_arrays(chunks) if chunks else pa.array([], pa.large_string())
    if not ordered:
        keys = keys.take(pc.sort_indices(keys))
        if same:
            keys = keys.filter(pc.invert(_in_output_folders(keys)))
    return keys


class _OutputFolders:
    """The output folders a sorted listing is inside of, to drop their PNGs as they pass.

    In key order an input `<stem>.<ext>` (or `<stem>`) comes before every key of its output
    folder `<stem>/` ('.' sorts before '/'), and the folder's keys all sort before `<stem>0`
    ('0' follows '/'). So a folder is opened by its input and closed when the listing reaches
    `<stem>0`: only folders the listing is still inside of are held (a few, not one per input),
    and a key in an open folder named like an output is exactly what the rule drops.
    """

    def __init__(self) -> None:
        self._open: set[str] = set()
        self._ends: list[tuple[str, str]] = []  # heap of (first key past the folder, folder)
        self._root = False  # an input `.png` (stem "") makes top-level output names outputs

    def holds(self, key: str) -> bool:
        """True when `key` is an output in the folder (or a face folder) of an earlier input."""
        while self._ends and self._ends[0][0] <= key:
            self._open.discard(heapq.heappop(self._ends)[1])
        folder, _, name = key.rpartition("/")
        if OUTPUT_NAME.match(name):
            face = FACE_FOLDER.match(folder)
            return self._is_open(folder) or (face is not None and self._is_open(face["parent"]))
        base = output_base(key)
        if base == "":
            self._root = True
        elif base not in self._open:
            self._open.add(base)
            heapq.heappush(self._ends, (base + "0", base))
        return False

    def _is_open(self, folder: str | None) -> bool:
        return self._root if not folder else folder in self._open


def _output_bases(keys: pa.Array) -> pa.Array:
    """`output_base` of every key, vectorised: the last `.<ext>` of the file name removed."""
    return pc.replace_substring_regex(keys, r"\.[^./]*$", "")


def _in_output_folders(keys: pa.Array) -> pa.Array:
    """Mask of keys named like an output in another key's output (or face) folder, vectorised."""
    names = pc.replace_substring_regex(keys, r"(?s)^.*/", "")
    is_output = pc.match_substring_regex(names, OUTPUT_NAME.pattern)
    folders = pc.if_else(
        pc.match_substring(keys, "/"), pc.replace_substring_regex(keys, r"/[^/]*$", ""), ""
    )
    parents = pc.struct_field(pc.extract_regex(folders, FACE_FOLDER.pattern), "parent")
    in_face_folder = pc.match_substring_regex(folders, FACE_FOLDER.pattern)
    bases = pc.unique(_output_bases(keys.filter(pc.invert(is_output))))
    in_base = pc.or_(
        pc.is_in(folders, value_set=bases),
        pc.and_(in_face_folder, pc.is_in(parents, value_set=bases)),
    )
    return pc.and_(is_output, in_base)


def _collisions(keys: pa.Array, base_codes: np.ndarray) -> dict[str, str]:
    """`find_collisions` on sorted keys, vectorised: only colliding keys become Python strings.

    `base_codes` come from `dictionary_encode`, which numbers bases in order of first
    appearance, so a key is the first of its base exactly when its code exceeds every earlier one.
    """
    if len(base_codes) == 0:
        return {}
    earlier_max = np.maximum.accumulate(np.concatenate(([-1], base_codes[:-1])))
    first = base_codes > earlier_max
    if first.all():
        return {}
    first_of_code = np.flatnonzero(first)
    later = np.flatnonzero(~first)
    colliding = keys.take(pa.array(later)).to_pylist()
    firsts = keys.take(pa.array(first_of_code[base_codes[later]])).to_pylist()
    return dict(zip(colliding, firsts, strict=True))


@dataclass
class _IndexRows:
    """Dest's index reduced to what discovery needs: 31 bytes a row, in numpy arrays.

    Rows of inputs not in the listing are dropped while reading. `good`: status "ok", sample in
    range and output key the derived `<output folder>/sample-<k>.png` (a face's output folder
    for a face row; its existence is checked against dest's listing). An "ok" row with any
    other output key (none today) is kept in `odd_keys` and checked on its own.
    """

    pos: np.ndarray  # int32: the input's position in the listing
    face: np.ndarray  # int32: face_index; -1 = a whole input (face_index None)
    sample: np.ndarray  # int32: sample_index
    handled: np.ndarray  # bool: status "ok" or "no-faces" (DONE_STATUSES)
    nofaces: np.ndarray  # bool: status == "no-faces"
    good: np.ndarray  # bool
    created: np.ndarray  # int64: created_at, us since the epoch
    run: np.ndarray  # int32: code into `runs`
    part: np.ndarray  # int32: ordinal into `parts` (sorted part keys)
    row: np.ndarray  # int32: position in its part
    runs: list[str]
    parts: list[str]
    odd_keys: dict[int, str]  # row number (into these arrays) -> output key, "ok" but not derived


def _done_inputs(
    dest: Storage, keys: pa.Array, base_codes: np.ndarray, bases: pa.Array, samples: int
) -> np.ndarray:
    """Mask of listed inputs that dest holds complete: index rows "ok" and PNGs listed."""
    done = np.zeros(len(keys), dtype=bool)
    rows = _read_index_rows(dest, keys, samples)
    if rows is None:
        return done
    current = _current_rows(rows, len(keys), keys, samples)
    good = np.flatnonzero(current & rows.good)
    odd = [i for i in rows.odd_keys if current[i]]
    complete = np.zeros(len(rows.pos), dtype=bool)
    if len(good):
        folders, codes = _sample_folders(rows, good, base_codes, bases)
        listed = _listed_samples(dest, folders, samples)
        complete[good] = listed[codes, rows.sample[good]]
    for i in odd:
        complete[i] = dest.exists(rows.odd_keys[i])
    return _complete_inputs(rows, current, complete, len(keys), samples)


def _sample_folders(
    rows: _IndexRows, good: np.ndarray, base_codes: np.ndarray, bases: pa.Array
) -> tuple[pa.Array, np.ndarray]:
    """(output folders to match PNGs against, each `good` row's code into them).

    Whole inputs use their input's folder (`bases`); face rows `<folder>/face-<i>`, built only
    for those rows and appended after `bases`, so an archive without faces builds nothing.
    """
    codes = base_codes[rows.pos[good]].astype(np.int64)
    faces = rows.face[good] >= 0
    if not faces.any():
        return bases, codes
    text = bases.type
    face_rows = good[faces]
    named = pc.binary_join_element_wise(
        bases.take(pa.array(base_codes[rows.pos[face_rows]])),
        pa.scalar("/face-", text),
        pc.cast(pa.array(rows.face[face_rows]), text),
        pa.scalar("", text),
    )
    encoded = pc.dictionary_encode(named)
    codes[faces] = len(bases) + encoded.indices.to_numpy(zero_copy_only=False)
    return pa.concat_arrays([bases, encoded.dictionary.cast(text)]), codes


def _complete_inputs(
    rows: _IndexRows, current: np.ndarray, complete: np.ndarray, n_keys: int, samples: int
) -> np.ndarray:
    """Inputs whose every face group (or the whole input) has `samples` complete rows.

    Current rows are unique per (input, face, sample < samples), so an input with g groups
    (distinct face_index among its current rows; a whole input is one group) is complete when
    it has exactly g x samples complete rows. A current "no-faces" row makes its photo done.
    """
    counts = np.bincount(rows.pos[complete], minlength=n_keys)
    span = int(rows.face.max()) + 2 if len(rows.face) else 1  # face + 1 in 0 .. span - 1
    pos = rows.pos[current].astype(np.int64)
    if span == 1:  # no face rows: one group per input with current rows
        groups = (np.bincount(pos, minlength=n_keys) > 0).astype(np.int64)
    else:
        pairs = np.unique(pos * span + rows.face[current] + 1)
        groups = np.bincount(pairs // span, minlength=n_keys)
    nofaces = np.zeros(n_keys, dtype=bool)
    nofaces[rows.pos[current & rows.nofaces]] = True
    return nofaces | ((groups > 0) & (counts == samples * groups))


def _read_index_rows(dest: Storage, keys: pa.Array, samples: int) -> _IndexRows | None:
    """Stream the index's parts (`INDEX_COLUMNS` only) into `_IndexRows`; None: no rows.

    Each part is reduced to flags and numbers as it is read (its output keys and statuses are
    dropped there), then parts are gathered into blocks of about `MATCH_ROWS` rows whose input
    keys are matched against the listing at once. A block is released before the next one.
    """
    runs: dict[str, int] = {}
    parts: list[str] = []
    blocks: list[dict[str, np.ndarray]] = []
    odd_keys: dict[int, str] = {}
    offset = 0
    gathered: list[pa.Table] = []
    gathered_rows = 0

    def reduce_block() -> None:
        nonlocal offset, gathered, gathered_rows
        block = _reduce_block(pa.concat_tables(gathered), keys)
        gathered, gathered_rows = [], 0
        for i, key in block.pop("odd_keys").items():
            odd_keys[offset + i] = key
        blocks.append(block)
        offset += len(block["pos"])
        pa.default_memory_pool().release_unused()  # give the block's strings back now

    for ordinal, (key, table) in enumerate(iter_index_parts(dest, INDEX_COLUMNS)):
        parts.append(key)
        if table.num_rows == 0:
            continue
        gathered.append(_compact_part(table, ordinal, runs, samples))
        gathered_rows += table.num_rows
        if gathered_rows >= MATCH_ROWS:
            reduce_block()
    if gathered:
        reduce_block()
    if offset == 0:
        return None
    columns = {}
    for name in list(blocks[0]):  # one column at a time: the peak is the rows plus one column
        columns[name] = np.concatenate([b.pop(name) for b in blocks])
    return _IndexRows(**columns, runs=list(runs), parts=parts, odd_keys=odd_keys)


def _compact_part(table: pa.Table, ordinal: int, runs: dict[str, int], samples: int) -> pa.Table:
    """One part as its input keys plus flags and numbers (run ids coded through `runs`)."""
    text = pa.large_string()
    input_key = table.column("input_key").combine_chunks().cast(text)
    face = table.column("face_index").combine_chunks()
    sample = table.column("sample_index").combine_chunks()
    status = table.column("status").combine_chunks()
    ok = pc.equal(status, "ok")
    in_range = pc.and_(pc.greater_equal(sample, 0), pc.less(sample, samples))
    folder = _output_bases(input_key)
    face_folder = pc.binary_join_element_wise(
        folder, pa.scalar("/face-", text), pc.cast(face, text), pa.scalar("", text)
    )  # null for whole inputs
    derived = pc.binary_join_element_wise(
        pc.coalesce(face_folder, folder),
        pa.scalar("/sample-", text),
        pc.cast(sample, text),
        pa.scalar(".png", text),
        pa.scalar("", text),  # the separator
    )
    output = table.column("output_key").combine_chunks().cast(text)
    same = pc.fill_null(pc.equal(output, derived), False)
    claimed = pc.and_(ok, in_range)
    odd = pc.and_(pc.and_(claimed, pc.is_valid(output)), pc.invert(same))
    run_ids = pc.dictionary_encode(table.column("run_id").combine_chunks())
    codes = np.array(
        [runs.setdefault(r, len(runs)) for r in run_ids.dictionary.to_pylist()], dtype=np.int32
    )
    n = table.num_rows
    return pa.table(
        {
            "input_key": input_key,
            "face_index": pc.fill_null(face, -1),
            "sample_index": sample,
            "handled": pc.is_in(status, value_set=pa.array(DONE_STATUSES)),
            "nofaces": pc.equal(status, "no-faces"),
            "good": pc.and_(claimed, same),
            "odd_key": pc.if_else(odd, output, pa.scalar(None, text)),
            "created": table.column("created_at").combine_chunks().cast(pa.int64()),
            "run": codes[run_ids.indices.to_numpy(zero_copy_only=False)],
            "part": np.full(n, ordinal, dtype=np.int32),
            "row": np.arange(n, dtype=np.int32),
        }
    )


def _reduce_block(block: pa.Table, keys: pa.Array) -> dict[str, Any]:
    """A block of compacted parts as numpy columns of `_IndexRows`, listed inputs only."""
    pos = pc.index_in(block.column("input_key"), value_set=keys)
    listed = pc.is_valid(pos)
    block = block.drop_columns(["input_key"]).filter(listed)
    odd_key = block.column("odd_key")
    odd_rows = np.flatnonzero(pc.is_valid(odd_key).to_numpy(zero_copy_only=False))
    odd_keys = dict(
        zip(odd_rows.tolist(), odd_key.take(pa.array(odd_rows)).to_pylist(), strict=True)
    )

    def numbers(name: str) -> np.ndarray:
        return block.column(name).to_numpy()

    return {
        "pos": pos.filter(listed).to_numpy(zero_copy_only=False).astype(np.int32),
        "face": numbers("face_index").astype(np.int32),
        "sample": numbers("sample_index").astype(np.int32),
        "handled": numbers("handled"),
        "nofaces": numbers("nofaces"),
        "good": numbers("good"),
        "created": numbers("created"),
        "run": numbers("run"),
        "part": numbers("part"),
        "row": numbers("row"),
        "odd_keys": odd_keys,
    }


def _current_rows(rows: _IndexRows, n_keys: int, keys: pa.Array, samples: int) -> np.ndarray:
    """Mask of the rows `read_index` would return for samples 0..samples-1.

    Almost every input has the rows of one writer (run + part) and one row per (face, sample):
    those rows are current as they are, which integer reductions decide (per input the lowest
    and highest writer, per (input, face, sample) a count). The rest (re-runs not yet
    reconciled, repeats) go through the index's own rule, `index_keep_mask`, a block of whole
    inputs at a time, so the rule lives in one place and memory stays bounded.
    """
    in_range = (rows.sample >= 0) & (rows.sample < samples)
    run_rank = np.argsort(np.argsort(np.array(rows.runs, dtype=object))).astype(np.int64)
    writer = run_rank[rows.run] * len(rows.parts) + rows.part
    lowest = np.full(n_keys, np.iinfo(np.int64).max, dtype=np.int64)
    highest = np.full(n_keys, -1, dtype=np.int64)
    np.minimum.at(lowest, rows.pos, writer)
    np.maximum.at(highest, rows.pos, writer)
    del writer
    tangled_input = highest > lowest  # inputs without rows: -1 > max is False
    del lowest, highest
    tangled_input |= _repeated_inputs(rows, in_range, n_keys, samples)
    current = in_range & ~tangled_input[rows.pos]
    if tangled_input.any():
        tangled = np.flatnonzero(tangled_input[rows.pos])
        tangled = tangled[np.argsort(rows.pos[tangled], kind="stable")]  # grouped by input
        current[_rule_keep(rows, keys, tangled)] = True
        current &= in_range
    return current


def _repeated_inputs(
    rows: _IndexRows, in_range: np.ndarray, n_keys: int, samples: int
) -> np.ndarray:
    """Mask of inputs with two rows for one (face, sample < samples).

    Without face rows, a count per (input, sample) cell (`bincount`, as fast as it gets); with
    them the cells are too many to allocate (inputs x faces x samples), so the ids are sorted
    and neighbours compared instead.
    """
    span = int(rows.face.max()) + 2 if len(rows.face) else 1
    pos = rows.pos[in_range].astype(np.int64)
    if span == 1:
        ids = pos * samples + rows.sample[in_range]
        repeats = np.bincount(ids, minlength=n_keys * samples) > 1
        return repeats.reshape(n_keys, samples).any(axis=1)
    ids = np.sort((pos * span + rows.face[in_range] + 1) * samples + rows.sample[in_range])
    repeated = ids[1:][ids[1:] == ids[:-1]]
    out = np.zeros(n_keys, dtype=bool)
    out[repeated // (span * samples)] = True
    return out


def _rule_keep(rows: _IndexRows, keys: pa.Array, tangled: np.ndarray) -> np.ndarray:
    """Row numbers among `tangled` (rows of whole inputs, grouped by input) the rule keeps."""
    kept: list[np.ndarray] = []
    runs = pa.array(rows.runs, pa.string())
    parts = pa.array(rows.parts, pa.string())
    start = 0
    while start < len(tangled):
        stop = min(start + MATCH_ROWS, len(tangled))
        while stop < len(tangled) and rows.pos[tangled[stop]] == rows.pos[tangled[stop - 1]]:
            stop += 1  # never split an input: the rule is decided per input
        chunk = tangled[start:stop]
        table = pa.table(
            {
                "input_key": keys.take(pa.array(rows.pos[chunk])),
                "face_index": pa.array(rows.face[chunk], pa.int32(), mask=rows.face[chunk] < 0),
                "sample_index": pa.array(rows.sample[chunk], pa.int32()),
                "status": pc.if_else(
                    pa.array(rows.nofaces[chunk]),
                    "no-faces",
                    pc.if_else(pa.array(rows.handled[chunk]), "ok", "failed"),
                ),
                "created_at": pa.array(rows.created[chunk]).cast(pa.timestamp("us", tz="UTC")),
                "run_id": runs.take(pa.array(rows.run[chunk])),
                "_part": parts.take(pa.array(rows.part[chunk])),
                "_row": pa.array(rows.row[chunk].astype(np.int64)),
            }
        )
        keep = index_keep_mask(table).to_numpy(zero_copy_only=False)
        kept.append(chunk[keep])
        start = stop
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def _listed_samples(dest: Storage, bases: pa.Array, samples: int) -> np.ndarray:
    """(output folders x samples) mask of the `<folder>/sample-<k>.png` dest lists.

    Streams dest's PNG listing: keys that may be samples are gathered in Arrow blocks, parsed
    with one regex and matched against the folders `MATCH_ROWS` at a time. Replaces a Python set
    of every PNG key in dest (9 per restored input with 4 samples: 9M str for 1M inputs).
    """
    listed = np.zeros((len(bases), samples), dtype=bool)
    found_folders: list[pa.Array] = []
    found_samples: list[np.ndarray] = []
    found = 0

    def parse(buffer: list[str]) -> None:
        nonlocal found
        parsed = pc.extract_regex(pa.array(buffer, pa.large_string()), _SAMPLE_PNG)
        parsed = parsed.filter(pc.is_valid(parsed))
        k = pc.cast(pc.struct_field(parsed, "k"), pa.int64()).to_numpy()
        wanted = k < samples
        found_folders.append(pc.struct_field(parsed, "base").filter(pa.array(wanted)))
        found_samples.append(k[wanted])
        found += int(wanted.sum())

    def match() -> None:
        nonlocal found
        codes = pc.index_in(pa.concat_arrays(found_folders), value_set=bases)
        hit = pc.is_valid(codes).to_numpy(zero_copy_only=False)
        k = np.concatenate(found_samples)
        listed[codes.filter(pa.array(hit)).to_numpy(), k[hit]] = True
        found_folders.clear()
        found_samples.clear()
        found = 0

    buffer: list[str] = []
    for info in dest.list(suffixes=(".png",)):
        key = info.key
        if "/sample-" in key and not key.endswith("-lr.png"):  # halves the parsing
            buffer.append(key)
            if len(buffer) == LIST_CHUNK:
                parse(buffer)
                buffer = []
                if found >= MATCH_ROWS:
                    match()
    if buffer:
        parse(buffer)
    if found:
        match()
    return listed


def write_plan(dest: Storage, run_id: str, pending: Sequence[str]) -> str:
    """Store a run's pending keys as `_runs/<run id>/plan.parquet`; returns the key.

    The fan-out reads its batches from here rather than from a flow parameter (Prefect keeps
    parameters in its database: a million keys would be ~40 MB of JSON per run).
    """
    keys = pending.arrow if isinstance(pending, KeyList) else pa.array(list(pending), pa.string())
    key = f"{RUNS_PREFIX}/{run_id}/plan.parquet"
    write_parquet(dest, key, pa.table({"input_key": keys}))
    return key


def read_plan(dest: Storage, key: str) -> KeyList:
    return KeyList(read_manifest(dest, key).column("input_key"))


# ----------------------------------------------------------------------------
# One batch: decode -> restore -> render -> record
#
# With `settings.faces` "align" or "paste" an input is a whole photo: decoding finds and aligns
# its faces (`decode_photos`), and each face is one search input beside every other face of the
# batch, as an LR crop would be. Rendering writes each face's samples in its own folder
# (`<photo>/face-<i>/`) and, with "paste", the photo with every face pasted back; recording
# writes one row per (face, sample). A photo without faces is done, with status "no-faces".


@dataclass
class SampleOutcome:
    """One written sample, as the summary and the CLI show it (the manifest has the rest)."""

    index: int
    seed: int
    method: str  # restart | noise-resample
    converged: bool
    mse: float  # LR error at the best iterate
    output_key: str
    face: int | None = None  # the face of the photo it restores; None = the input itself


@dataclass
class InputOutcome:
    """One input's result in a batch, for tables, reports and the CLI."""

    input_key: str
    status: str  # ok | failed | no-faces (a photo without faces: done, reason in `error`)
    error: str | None
    sample_count: int  # selected samples written (over all faces of a photo)
    converged_count: int  # of which converged (LR error <= eps)
    best_mse: float | None  # lowest LR error among its samples
    output_keys: list[str]
    conversions: list[str] = field(default_factory=list)  # how the input was normalised
    lr_size: int | None = None  # side of the LR image searched (None: a photo's faces vary)
    factor: int | None = None  # generator resolution / lr_size
    samples: list[SampleOutcome] = field(default_factory=list)
    faces: int | None = None  # faces found in the photo; None = not run through the faces stage
    photo_key: str | None = None  # faces=paste: the photo with its faces pasted back
    steps: int = 0  # optimiser steps spent on it, every attempt (restart) counted
    best_step: int | None = None  # step of the best sample's best iterate
    attempts: int = 0  # searches run for it (selected samples + extra restarts), all faces


@dataclass
class BatchOutcome:
    batch_id: str
    inputs: list[InputOutcome]
    seconds: float
    worker: str  # "<host>:<pid>" of the process that ran it
    model_loads: int  # loads of the model in that process so far (1 = cached ever since)
    device: str
    generator_id: str
    generator_checksum: str

    @property
    def ok_count(self) -> int:
        return sum(i.status == "ok" for i in self.inputs)

    @property
    def failed_count(self) -> int:
        return sum(i.status == "failed" for i in self.inputs)

    @property
    def no_faces_count(self) -> int:
        return sum(i.status == "no-faces" for i in self.inputs)


@dataclass
class DecodedInput:
    """An input read, normalised and fitted: ready for the search."""

    key: str
    loaded: LoadedImage
    prepared: PreparedInput

    @property
    def label(self) -> str:
        """The search's name for it (seeds derive from it): the input key."""
        return self.key

    @property
    def lr(self) -> torch.Tensor:
        return self.prepared.tensor

    @property
    def checksum(self) -> str:
        return self.loaded.checksum

    def record(self) -> InputRecord:
        fit = self.prepared.fit
        return InputRecord(
            key=self.key,
            checksum=self.loaded.checksum,
            lr_size=self.prepared.lr_size,
            factor=self.prepared.factor,
            fit_policy=fit.policy,
            fit_box=fit.box if fit.changed else None,
            conversions=tuple(self.prepared.conversions),
        )


@dataclass
class DecodedPhoto:
    """A whole photo for the faces stage: its 8-bit pixels and the faces found in it."""

    key: str
    checksum: str  # sha256 of the photo's bytes
    conversions: list[str]  # how it was normalised to RGB
    rgb: np.ndarray  # (H, W, 3) uint8: 4x smaller than the float tensor, all paste-back needs
    faces: list[AlignedFace]  # in the detector's order; [] = none found


@dataclass
class FaceInput:
    """One face of a whole photo, aligned to the generator's frame: one search input."""

    photo: DecodedPhoto
    face: AlignedFace

    @property
    def key(self) -> str:
        return self.photo.key

    @property
    def label(self) -> str:
        """`photo.jpg#face-2`: seeds differ per face and stay stable across re-runs."""
        return f"{self.photo.key}#face-{self.face.index}"

    @property
    def lr(self) -> torch.Tensor:
        return self.face.lr

    @property
    def checksum(self) -> str:
        return self.photo.checksum

    def record(self, photo_output_key: str | None, upscale: int | None) -> InputRecord:
        f = self.face
        det = f.detected
        return InputRecord(
            key=self.photo.key,
            checksum=self.photo.checksum,
            lr_size=f.lr_size,
            factor=f.factor,
            fit_policy=FACE_FIT_POLICY,
            fit_box=None,
            conversions=tuple(self.photo.conversions),
            face=FaceRecord(
                index=f.index,
                box=det.box,
                landmarks=tuple(float(v) for v in det.landmarks.reshape(-1)),
                score=det.score,
                recipe=f.recipe,
            ),
            photo_output_key=photo_output_key,
            upscale=upscale,
        )


SearchInput = DecodedInput | FaceInput
_Decoded = TypeVar("_Decoded", DecodedInput, DecodedPhoto)
FACE_FIT_POLICY = "align"  # fit_policy of face rows: aligned by a recipe (face_recipe column)
NO_FACES_REASON = "no face found (detector min_face_size {size:g} px); nothing to restore"


@dataclass
class FailedInput:
    key: str
    reason: str
    checksum: str | None = None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def read_input(key: str, source: Storage, collisions: dict[str, str] | None) -> bytes | FailedInput:
    """An input's bytes, or why it cannot be used (transient storage errors propagate)."""
    if collisions and key in collisions:
        reason = (
            f"output folder {output_base(key)!r} is also derived from {collisions[key]!r}; "
            "rename one of them"
        )
        return FailedInput(key, reason)
    try:
        validate_key(output_base(key) + "/sheet.png")
    except PulseError as exc:  # `.png`, `..png`, `sub/.png`: no folder can be named after it
        return FailedInput(
            key, f"no output folder can be named after this input ({exc}); rename it"
        )
    try:
        return source.read_bytes(key)
    except PulseError as exc:
        if is_transient(exc):
            raise
        return FailedInput(key, f"cannot read input: {exc}")


def decode_inputs(
    keys: list[str],
    source: Storage,
    settings: RestoreSettings,
    resolution: int,
    collisions: dict[str, str] | None = None,
) -> tuple[list[DecodedInput], list[FailedInput]]:
    """Read and normalise each input; what cannot be used becomes a FailedInput with a reason.

    Transient storage errors propagate (the batch is retried); every other error is the input's.
    """

    def decode(key: str, data: bytes) -> DecodedInput:
        loaded = load_image(data, name=key, max_pixels=settings.max_pixels)
        return DecodedInput(key, loaded, prepare_input(loaded, resolution, settings.fit))

    return _decode_each(keys, source, collisions, decode)


def decode_photos(
    keys: list[str],
    source: Storage,
    settings: RestoreSettings,
    generator: Generator,
    collisions: dict[str, str] | None = None,
) -> tuple[list[DecodedPhoto], list[FailedInput]]:
    """The faces stage's decode: each photo read whole, its faces detected and aligned.

    Faces are framed for `generator` (its resolution, `settings.recipe_for` its family) and
    their LR inputs made with the search's own forward operator, so DS(HR crop) == LR. The
    detector runs on the generator's device. A photo the detector finds nothing in is returned
    with `faces == []` (it is done, not failed). Without the MTCNN weights this raises
    `FacesUnavailable` before reading anything: a missing asset is the run's problem, and
    recording it as a failure of every photo would bury the one line that says how to fix it.
    """
    device = generator.device
    load_mtcnn(device)  # FacesUnavailable (with `pulse models pull mtcnn`) before any photo
    recipe = settings.recipe_for(generator.family)

    def decode(key: str, data: bytes) -> DecodedPhoto:
        loaded = load_image(data, name=key, max_pixels=settings.max_pixels)
        rgb = as_rgb_array(loaded.tensor)  # kept instead of the float tensor: 4x smaller
        found = detect_faces(rgb, min_face_size=settings.min_face_size, device=device)
        aligned = align_faces(
            rgb,
            found,
            generator.resolution,
            recipe=recipe,  # type: ignore[arg-type]  # "ffhq" | "digiface", resolved
            operator=settings.config.operator,
        )
        return DecodedPhoto(key, loaded.checksum, list(loaded.conversions), rgb, aligned)

    return _decode_each(keys, source, collisions, decode)


def _decode_each(
    keys: list[str],
    source: Storage,
    collisions: dict[str, str] | None,
    decode: Callable[[str, bytes], _Decoded],
) -> tuple[list[_Decoded], list[FailedInput]]:
    """`decode(key, bytes)` of each readable input; a PulseError fails that input only."""
    decoded: list[_Decoded] = []
    failed: list[FailedInput] = []
    for key in keys:
        data = read_input(key, source, collisions)
        if isinstance(data, FailedInput):
            failed.append(data)
            continue
        try:
            decoded.append(decode(key, data))
        except PulseError as exc:
            failed.append(FailedInput(key, str(exc), _checksum(data)))
    return decoded, failed


def restore_decoded(
    decoded: Sequence[SearchInput],
    generator: Generator,
    settings: RestoreSettings,
    on_step: StepCallback | None = None,
) -> tuple[list[tuple[Any, RestoreResult]], list[FailedInput]]:
    """Search every input (LR crop or face) in shared batches; a search error fails them only.

    Returns (input, result) pairs in the order given; the pairs' first items are the inputs
    passed in (DecodedInput or FaceInput). Failed inputs come back once per input key, so the
    faces of one photo fail together.
    """
    if not decoded:
        return [], []
    try:
        results = restore_many(
            [d.lr for d in decoded],
            generator,
            settings.samples,
            keys=[d.label for d in decoded],
            config=settings.config,
            seed=settings.seed,
            resample=settings.resample,
            search_batch=settings.batch_rows,
            on_step=on_step,
            execution=settings.execution(),
        )
    except (PulseError, RuntimeError) as exc:  # e.g. CUDA out of memory: fail rows, go on
        first = {d.key: d.checksum for d in decoded}
        return [], [FailedInput(k, f"search failed: {exc}", c) for k, c in first.items()]
    for d, res in zip(decoded, results, strict=True):
        res.conversions = list(
            d.prepared.conversions if isinstance(d, DecodedInput) else d.photo.conversions
        )
    return list(zip(decoded, results, strict=True)), []


def process_batch(
    input_keys: list[str],
    source: Storage,
    dest: Storage,
    settings: RestoreSettings,
    *,
    run_id: str,
    batch_id: str,
    collisions: dict[str, str] | None = None,
    generator: Generator | None = None,
    on_step: StepCallback | None = None,
) -> BatchOutcome:
    """Restore one batch of inputs and write their PNGs and manifest parts to dest.

    `generator`: an already loaded one (the CLI); None loads `settings.model` on
    `settings.device` from the process cache (a worker loads each model once).
    """
    started = time.perf_counter()
    if generator is None:
        generator = load_generator(settings.model, pick_device(settings.device))
    device = str(generator.device)
    ctx = RowContext(
        run_id=run_id,
        generator_id=generator.model_id,
        generator_checksum=generator.checksum,
        eps=settings.config.eps,
        device=device,
        created_at=datetime.now(UTC),
    )
    photos: list[DecodedPhoto] = []
    decoded: list[SearchInput] = []
    if settings.faces == "none":
        inputs, failed = decode_inputs(
            input_keys, source, settings, generator.resolution, collisions
        )
        decoded += inputs
    else:
        photos, failed = decode_photos(input_keys, source, settings, generator, collisions)
        decoded += [FaceInput(p, f) for p in photos for f in p.faces]
    restored, search_failed = restore_decoded(decoded, generator, settings, on_step)
    failed += search_failed

    done = [record_failure(ctx, f, settings.samples) for f in failed]
    faces_of: dict[str, list[tuple[FaceInput, RestoreResult]]] = {}
    for d, res in restored:
        if isinstance(d, FaceInput):
            faces_of.setdefault(d.key, []).append((d, res))
        else:
            done.append(render_input(dest, ctx, d, res))
    failed_keys = {f.key for f in failed}
    done += [
        render_photo(dest, ctx, p, faces_of.get(p.key, []), settings)
        for p in photos
        if p.key not in failed_keys
    ]
    rows = [row for r in done for row in r.rows]
    losses = [row for r in done for row in r.losses]
    write_batch_manifests(dest, run_id, batch_id, samples_table(rows), losses_table(losses))
    outcomes = {r.outcome.input_key: r.outcome for r in done}
    return BatchOutcome(
        batch_id=batch_id,
        inputs=[outcomes[k] for k in input_keys],
        seconds=time.perf_counter() - started,
        worker=worker_id(),
        model_loads=load_counts().get(generator.model_id, 0),
        device=device,
        generator_id=generator.model_id,
        generator_checksum=generator.checksum,
    )


# ----------------------------------------------------------------------------
# Render and record: one input's (or photo's) PNGs written, its rows and outcome made


@dataclass
class Recorded:
    """What one input adds to the batch: its samples and losses rows, and its outcome."""

    rows: list[dict[str, Any]]
    losses: list[dict[str, Any]]
    outcome: InputOutcome


def record_failure(ctx: RowContext, f: FailedInput, samples: int) -> Recorded:
    rows = failed_rows(ctx, f.key, f.reason, samples, f.checksum)
    return Recorded(rows, [], InputOutcome(f.key, "failed", f.reason, 0, 0, None, []))


def render_input(dest: Storage, ctx: RowContext, d: DecodedInput, res: RestoreResult) -> Recorded:
    """An LR input restored whole: its samples, LR checks and sheet, then its rows."""
    outputs = write_outputs(dest, d.key, res, ctx.generator_id)
    remove_stale_outputs(dest, d.key, keep=written_keys(d.key, outputs))  # older runs' extras
    samples = _sample_outcomes(res, outputs, None)
    outcome = InputOutcome(
        input_key=d.key,
        status="ok",
        error=None,
        sample_count=len(res.samples),
        converged_count=res.converged_count,
        best_mse=min(s.mse for s in res.samples),
        output_keys=[s.output_key for s in samples],
        conversions=list(res.conversions),
        lr_size=d.prepared.lr_size,
        factor=d.prepared.factor,
        samples=samples,
        **_effort([res]),
    )
    rows = sample_rows(ctx, d.record(), res.attempts, outputs)
    return Recorded(rows, loss_rows(ctx.run_id, d.key, res.attempts), outcome)


def render_photo(
    dest: Storage,
    ctx: RowContext,
    photo: DecodedPhoto,
    faces: Sequence[tuple[FaceInput, RestoreResult]],
    settings: RestoreSettings,
) -> Recorded:
    """A whole photo: each face's samples in `face-<i>/`, the pasted photo, one row per sample.

    With faces=paste, `restored.png` is the photo enlarged by `settings.upscale` (Lanczos) with
    each face's sample 0 (the best selected one) pasted back; a photo without faces gets the
    plain enlargement, so every photo in has a photo out. Outputs of earlier runs that this one
    did not write (a face no longer found, samples beyond `settings.samples`) are removed last.
    """
    pasted: str | None = None
    upscale = settings.upscale if settings.faces == "paste" else None
    if upscale is not None:
        best = [res.samples[0].hr for _, res in faces]
        image = paste_faces(photo.rgb, [f.face for f, _ in faces], best, upscale=upscale).image
        pasted = write_photo(dest, photo.key, image, ctx.generator_id)
    keep = {pasted} if pasted else set()
    rows: list[dict[str, Any]] = []
    losses: list[dict[str, Any]] = []
    samples: list[SampleOutcome] = []
    for f, res in faces:
        index = f.face.index
        outputs = write_outputs(dest, photo.key, res, ctx.generator_id, index)
        keep |= written_keys(photo.key, outputs, index)
        samples += _sample_outcomes(res, outputs, index)
        rows += sample_rows(ctx, f.record(pasted, upscale), res.attempts, outputs)
        losses += loss_rows(ctx.run_id, photo.key, res.attempts, index)
    remove_stale_outputs(dest, photo.key, keep=keep)
    if not faces:
        reason = NO_FACES_REASON.format(size=settings.min_face_size)
        rows = no_faces_rows(
            ctx,
            photo.key,
            reason,
            photo.checksum,
            photo.conversions,
            photo_output_key=pasted,
            upscale=upscale,
        )
    outcome = InputOutcome(
        input_key=photo.key,
        status="ok" if faces else "no-faces",
        error=None if faces else rows[0]["error"],
        sample_count=len(samples),
        converged_count=sum(s.converged for s in samples),
        best_mse=min((s.mse for s in samples), default=None),
        output_keys=[s.output_key for s in samples],
        conversions=list(photo.conversions),
        samples=samples,
        faces=len(faces),
        photo_key=pasted,
        **_effort([res for _, res in faces]),
    )
    return Recorded(rows, losses, outcome)


def _effort(results: Sequence[RestoreResult]) -> dict[str, Any]:
    """Steps, attempts and the best sample's best step of an input (over all its faces)."""
    samples = [s for res in results for s in res.samples]
    best = min(samples, key=lambda s: s.mse, default=None)
    return {
        "steps": sum(res.steps_spent for res in results),
        "best_step": None if best is None else best.best_step,
        "attempts": sum(len(res.attempts) for res in results),
    }


def _sample_outcomes(
    res: RestoreResult, outputs: Mapping[int, tuple[str, str]], face: int | None
) -> list[SampleOutcome]:
    return [
        SampleOutcome(s.index, s.seed, s.method, s.converged, s.mse, outputs[s.index][0], face)
        for s in res.samples
    ]


def _checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------
# The run's summary: what `pulse upsample`, `pulse run` and the flow report


@dataclass
class RunSummary:
    """What a run did: the flow's return value, printed by `pulse run` and `pulse upsample`."""

    run_id: str
    source: str
    dest: str
    model: str
    model_checksum: str
    found: int  # images in source
    skipped: int  # already restored in dest
    attempted: int
    ok: int
    failed: int
    converged_input_count: int  # inputs with at least one converged sample
    samples_written: int
    seconds: float  # restore wall time (discovery and publishing excluded)
    samples_key: str = ""
    losses_key: str = ""
    workers: dict[str, int] = field(default_factory=dict)  # "<host>:<pid>" -> model loads there
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input key, reason), capped
    settings: dict[str, Any] = field(default_factory=dict)  # the effective RestoreSettings
    inputs: list[InputOutcome] = field(default_factory=list)  # the first 1,000 (failures kept)
    no_faces: int = 0  # faces stage: photos with no face found (done; in neither ok nor failed)
    faces_restored: int = 0  # faces stage: faces restored, over all photos
    loss: LossSummary | None = None
    batches: list[BatchRecord] = field(default_factory=list)  # the first 1,000
    devices: dict[str, int] = field(default_factory=dict)  # device -> batches run there

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchRecord:
    """One batch as the report lists it: which inputs, where it ran, how it went."""

    batch_id: str
    inputs: int
    first_key: str
    last_key: str
    ok: int
    failed: int
    device: str
    worker: str  # "<host>:<pid>"
    seconds: float

    @classmethod
    def of(cls, batch: BatchOutcome) -> BatchRecord:
        keys = [i.input_key for i in batch.inputs]
        return cls(
            batch.batch_id,
            len(keys),
            keys[0] if keys else "",
            keys[-1] if keys else "",
            batch.ok_count,
            batch.failed_count,
            batch.device,
            batch.worker,
            round(batch.seconds, 3),
        )


@dataclass
class LossSummary:
    """How well the run explained its inputs: the report's loss summary.

    Errors are each restored input's best LR error (its lowest over samples and faces), so the
    median says how a typical input fared, not a typical sample.
    """

    inputs: int  # restored inputs with samples
    converged_inputs: int  # of which with at least one sample within eps
    samples: int
    converged_samples: int
    min_error: float | None
    median_error: float | None
    max_error: float | None
    steps: int  # optimiser steps spent, every attempt counted
    attempts: int  # searches run (selected samples + extra restarts)

    @property
    def converged_share(self) -> float | None:
        return self.converged_inputs / self.inputs if self.inputs else None


@dataclass
class RunTally:
    """What a run reports, accumulated batch by batch in bounded memory.

    Counts are exact; per-input detail is kept for the first `keep_inputs` inputs (failures
    first once the cap is reached) and the first `keep_failures` failures: a 1M-input run would
    otherwise hold a million InputOutcome objects (hundreds of MB) for a report that shows a
    thousand rows. The run manifest has every row.
    """

    keep_inputs: int = 1000
    keep_failures: int = 10_000
    attempted: int = 0
    ok: int = 0
    failed: int = 0
    no_faces: int = 0  # photos without faces: handled (done), counted apart from ok and failed
    faces_restored: int = 0  # faces restored in ok photos
    converged_input_count: int = 0
    samples_written: int = 0
    batches: int = 0
    generator_id: str = ""
    generator_checksum: str = ""
    workers: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[InputOutcome] = field(default_factory=list)
    keep_batches: int = 1000
    batch_log: list[BatchRecord] = field(default_factory=list)  # the first `keep_batches`
    devices: dict[str, int] = field(default_factory=dict)  # device -> batches run there
    converged_samples: int = 0
    steps: int = 0
    search_attempts: int = 0
    # each restored input's best LR error: 8 bytes an input, for the exact median
    best_errors: array = field(default_factory=lambda: array("d"))

    def add(self, batch: BatchOutcome) -> None:
        self.batches += 1
        self.generator_id = self.generator_id or batch.generator_id
        self.generator_checksum = self.generator_checksum or batch.generator_checksum
        self.workers[batch.worker] = max(self.workers.get(batch.worker, 0), batch.model_loads)
        self.devices[batch.device] = self.devices.get(batch.device, 0) + 1
        if len(self.batch_log) < self.keep_batches:
            self.batch_log.append(BatchRecord.of(batch))
        for item in batch.inputs:
            self.attempted += 1
            self.steps += item.steps
            self.search_attempts += item.attempts
            if item.status == "ok":
                self.ok += 1
                self.faces_restored += item.faces or 0
                self.converged_input_count += item.converged_count > 0
                self.samples_written += len(item.output_keys)
                self.converged_samples += item.converged_count
                if item.best_mse is not None:
                    self.best_errors.append(item.best_mse)
            elif item.status == "no-faces":
                self.no_faces += 1
            else:
                self.failed += 1
                if len(self.failures) < self.keep_failures:
                    self.failures.append((item.input_key, item.error or ""))
            self._keep(item)

    def _keep(self, item: InputOutcome) -> None:
        if len(self.inputs) < self.keep_inputs:
            self.inputs.append(item)
        elif item.status == "failed":  # a failure displaces the last kept success, if any
            for i in range(len(self.inputs) - 1, -1, -1):
                if self.inputs[i].status != "failed":
                    self.inputs[i] = item
                    break

    @classmethod
    def of(cls, batches: Iterable[BatchOutcome]) -> RunTally:
        tally = cls()
        for batch in batches:
            tally.add(batch)
        return tally

    def loss_summary(self) -> LossSummary:
        errors = self.best_errors
        return LossSummary(
            inputs=len(errors),
            converged_inputs=self.converged_input_count,
            samples=self.samples_written,
            converged_samples=self.converged_samples,
            min_error=min(errors) if errors else None,
            median_error=statistics.median(errors) if errors else None,
            max_error=max(errors) if errors else None,
            steps=self.steps,
            attempts=self.search_attempts,
        )


def summarise(
    run_id: str,
    source: str,
    dest: str,
    settings: RestoreSettings,
    found: int,
    skipped: int,
    tally: RunTally,
    seconds: float,
    files: RunFiles | None = None,
) -> RunSummary:
    root = dest.rstrip("/")
    return RunSummary(
        run_id=run_id,
        source=source,
        dest=dest,
        model=tally.generator_id or settings.model,
        model_checksum=tally.generator_checksum,
        found=found,
        skipped=skipped,
        attempted=tally.attempted,
        ok=tally.ok,
        failed=tally.failed,
        converged_input_count=tally.converged_input_count,
        samples_written=tally.samples_written,
        seconds=seconds,
        samples_key=f"{root}/{files.samples_key}" if files else "",
        losses_key=f"{root}/{files.losses_key}" if files else "",
        workers=tally.workers,
        failures=tally.failures,
        settings=asdict(settings.resolved()),
        inputs=tally.inputs,
        no_faces=tally.no_faces,
        faces_restored=tally.faces_restored,
        loss=tally.loss_summary() if tally.batches else None,
        batches=tally.batch_log,
        devices=tally.devices,
    )


__all__ = [
    "IMAGE_SUFFIXES",
    "BatchOutcome",
    "BatchRecord",
    "DecodedInput",
    "DecodedPhoto",
    "Discovery",
    "FaceInput",
    "FailedInput",
    "InputOutcome",
    "KeyList",
    "LossSummary",
    "RunFiles",
    "RunSummary",
    "RunTally",
    "SampleOutcome",
    "decode_inputs",
    "decode_photos",
    "discover",
    "finalize_run",
    "listed_inputs",
    "output_base",
    "process_batch",
    "read_plan",
    "restore_decoded",
    "sample_keys",
    "summarise",
    "write_plan",
]
