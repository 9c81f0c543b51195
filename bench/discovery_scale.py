"""Discovery at archive scale: `discover` over a 1,000,000-key listing and a 4,000,000-row index.

Issue 9 ("Scale"): discovery must plan a million-input archive in bounded memory. This bench
builds that situation without a million files:

- source: a `Storage` whose `list` yields `--inputs` ObjectInfo lazily, in key order
  (`0000/img_0000000.jpg`, ...); nothing is stored.
- dest: a real local folder holding a real index (`_manifest/samples/part-*.parquet`, every
  `SAMPLES_SCHEMA` column, written with pyarrow) for `--inputs` inputs x `--samples` samples,
  whose `list` also yields, lazily, the PNGs those restored inputs left (per sample
  `sample-<k>.png` and `sample-<k>-lr.png`, plus `sheet.png`: 9 per input with 4 samples).

The archive has been restored before and has moved on since, as real ones do: the first 5% of the
listing is new (not in the index) and 5% of the index belongs to inputs no longer in source; 1%
of the indexed inputs failed, 1% lost a PNG; 0.1% were restored again by a newer run and 0.05%
failed again in a newer run, both not yet reconciled (so the index rule has work to do). The
expected answer is known in closed form and checked.

Each measurement runs in a fresh subprocess and reports its wall time and peak resident set
size (`ru_maxrss`: Arrow allocates outside Python's allocator, so tracemalloc would not see
it), plus the RSS just before `discover` (imports, torch included) so the increase is clear.
`--baseline` also measures the algorithm discovery had before (kept here as
`baseline_discover`: a list of every key, `read_index` with every column, a set of every PNG).

    python bench/discovery_scale.py                       # 1M inputs x 4 samples (4M rows)
    python bench/discovery_scale.py --baseline            # ... and the earlier algorithm
    python bench/discovery_scale.py --quick               # 20k inputs: the test suite's run
    python bench/discovery_scale.py --inputs 200000 --samples 2 --out results.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python bench/discovery_scale.py` from a checkout

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pulse_core.errors import StorageError  # noqa: E402
from pulse_core.storage import LocalStorage, ObjectInfo, Storage, StorageNotFoundError  # noqa: E402

TARGET_PEAK_GIB = 1.0  # issue 9: discovery of 1M keys against a 4M-row index under 1 GiB peak
INPUTS_PER_PART = 4_000  # index rows per part = this x samples (16k: a few hundred parts)
QUICK_INPUTS = 20_000
GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------------------------
# The archive: which input is where, in closed form


@dataclass(frozen=True)
class Archive:
    """The simulated archive: input i's key, and what dest's index and folders hold for it."""

    inputs: int  # keys in the source listing: i in [0, inputs)
    samples: int

    @property
    def first_indexed(self) -> int:
        return self.inputs // 20  # the first 5% of the listing are new since the last run

    @property
    def indexed(self) -> range:
        """Inputs with index rows: as many as the listing, 5% of them gone from source."""
        return range(self.first_indexed, self.first_indexed + self.inputs)

    @staticmethod
    def key(i: int) -> str:
        return f"{i // 1000:04d}/img_{i:07d}.jpg"

    @staticmethod
    def folder(i: int) -> str:
        return f"{i // 1000:04d}/img_{i:07d}"

    @staticmethod
    def failed(i: int) -> bool:
        return i % 97 == 0  # its only writer failed it

    @staticmethod
    def redone(i: int) -> bool:
        return i % 1009 == 0  # restored again by a newer run, not yet reconciled

    @staticmethod
    def failed_again(i: int) -> bool:
        return i % 2003 == 0 and i % 1009 != 0  # a newer run failed it (success stays)

    def restored(self, i: int) -> bool:
        """The index rule's answer: some writer restored it (a newer failure does not count)."""
        return i in self.indexed and (not self.failed(i) or self.redone(i))

    @staticmethod
    def lost_png(i: int) -> bool:
        return i % 89 == 0  # sample-0.png was deleted from dest

    def done(self, i: int) -> bool:
        return self.restored(i) and not self.lost_png(i)

    def expected(self) -> dict[str, int]:
        """What discover must report, counted the slow way (fine up to a few million)."""
        done = sum(self.done(i) for i in range(self.inputs))
        return {"total": self.inputs, "done": done, "pending": self.inputs - done}


# --------------------------------------------------------------------------------------------
# Storages: a listed-only source, and a dest whose PNGs are listed but never written


class ListedSource(Storage):
    """A source that only lists: `Archive.key(i)` for every input, lazily, in key order."""

    def __init__(self, archive: Archive, url: str = "s3://bench-archive/photos") -> None:
        self.archive = archive
        self._url = url

    @property
    def url(self) -> str:
        return self._url

    def list(self, prefix: str = "", suffixes: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        for i in range(self.archive.inputs):
            key = Archive.key(i)
            if key.startswith(prefix) and (wanted is None or key.lower().endswith(wanted)):
                yield ObjectInfo(key, 1024)

    def read_bytes(self, key: str) -> bytes:
        raise StorageNotFoundError(f"{key}: the bench source only lists")

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        raise StorageError("the bench source is read-only")

    def exists(self, key: str) -> bool:
        return False

    def delete(self, key: str) -> None:
        raise StorageError("the bench source is read-only")

    def child(self, prefix: str) -> Storage:
        raise StorageError("the bench source has no children")

    def check(self, create: bool = False) -> None:
        return None


class RestoredDest(LocalStorage):
    """A real local dest (its index is real Parquet) that also lists the PNGs of the archive's
    restored inputs, without writing them."""

    def __init__(self, root: str | os.PathLike[str], archive: Archive) -> None:
        super().__init__(root)
        self.archive = archive
        names = [f"sample-{k}{lr}.png" for k in range(archive.samples) for lr in ("-lr", "")]
        self._names = sorted([*names, "sheet.png"])

    def _pngs(self) -> Iterator[ObjectInfo]:
        a = self.archive
        for i in a.indexed:  # Archive.folder(i) sorts with i
            if not a.restored(i):
                continue
            folder = Archive.folder(i)
            for name in self._names:
                if name == "sample-0.png" and a.lost_png(i):
                    continue
                yield ObjectInfo(f"{folder}/{name}", 20_000)

    def list(self, prefix: str = "", suffixes: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
        real = super().list(prefix, suffixes)
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        if prefix.startswith("_") or (wanted is not None and ".png" not in wanted):
            yield from real  # the index, runs: only real files
            return
        pngs = (o for o in self._pngs() if o.key.startswith(prefix))
        yield from heapq.merge(real, pngs, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return super().exists(key) or any(o.key == key for o in self._pngs())


# --------------------------------------------------------------------------------------------
# The index: real Parquet parts


def write_index(dest: Path, archive: Archive) -> dict[str, int]:
    """Write the archive's index under dest/_manifest/samples: every SAMPLES_SCHEMA column."""
    from pulse_core.manifest import INDEX_PREFIX

    folder = dest / INDEX_PREFIX
    folder.mkdir(parents=True, exist_ok=True)
    started = datetime(2026, 11, 1, tzinfo=UTC)
    indexed = archive.indexed
    first_runs = 10
    per_run = -(-len(indexed) // first_runs)
    rows = parts = 0
    for run in range(first_runs):  # the runs that restored the archive, in order
        run_inputs = indexed[run * per_run : (run + 1) * per_run]
        for b in range(0, len(run_inputs), INPUTS_PER_PART):
            batch = run_inputs[b : b + INPUTS_PER_PART]
            table = _rows(archive, batch, f"run-{run:02d}", started + timedelta(days=run), None)
            pq.write_table(
                table,
                folder / f"part-run-{run:02d}-{b // INPUTS_PER_PART:05d}.parquet",
                compression="zstd",
            )
            rows += table.num_rows
            parts += 1
    late = started + timedelta(days=first_runs + 1)
    for name, pick, failed in (
        ("redo", Archive.redone, False),
        ("retry", Archive.failed_again, True),
    ):
        batch = [i for i in indexed if pick(i)]
        if batch:
            table = _rows(archive, batch, f"run-{name}", late, failed)
            pq.write_table(
                table,
                folder / f"part-run-{name}-00000.parquet",
                compression="zstd",
            )
            rows += table.num_rows
            parts += 1
    return {"rows": rows, "parts": parts}


def _rows(
    archive: Archive, inputs: range | list[int], run_id: str, created: datetime, failed: bool | None
) -> pa.Table:
    """One writer's rows for `inputs` x samples. failed None: by `Archive.failed`."""
    from pulse_core.manifest import FIT_BOX_TYPE, SAMPLES_SCHEMA, SCHEMA_VERSION

    s = archive.samples
    ids = np.repeat(np.asarray(list(inputs), dtype=np.int64), s)
    k = np.tile(np.arange(s, dtype=np.int32), len(inputs))
    bad = (
        np.full(len(ids), failed)
        if failed is not None
        else np.array([Archive.failed(int(i)) for i in ids])
    )
    keys = [Archive.key(int(i)) for i in ids]
    folders = [Archive.folder(int(i)) for i in ids]
    outputs = [
        None if b else f"{f}/sample-{j}.png" for f, j, b in zip(folders, k, bad, strict=True)
    ]
    lr_checks = [
        None if b else f"{f}/sample-{j}-lr.png" for f, j, b in zip(folders, k, bad, strict=True)
    ]
    n = len(ids)
    rng = np.random.default_rng(int(ids[0]) if n else 0)
    l2 = rng.uniform(1e-4, 1e-2, n)
    columns = {
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int32)),
        "run_id": pa.array([run_id] * n),
        "input_key": pa.array(keys),
        "input_checksum": pa.array([f"{i:064x}" for i in ids]),
        "lr_width": pa.array(np.full(n, 32, np.int32)),
        "lr_height": pa.array(np.full(n, 32, np.int32)),
        "factor": pa.array(np.full(n, 32, np.int32)),
        "fit_policy": pa.array(["exact"] * n),
        "fit_box": pa.StructArray.from_arrays(  # None = whole image; children valid zeros
            [pa.array(np.zeros(n, np.int32))] * 4,
            fields=list(FIT_BOX_TYPE),
            mask=pa.array(np.ones(n, bool)),
        ),
        "conversions": pa.array([[]] * n, pa.list_(pa.string())),
        "generator_id": pa.array(["ffhq-1024-stylegan2"] * n),
        "generator_checksum": pa.array(["ab" * 32] * n),
        "seed": pa.array(ids * 1000 + k),
        "sample_index": pa.array(k),
        "method": pa.array(["restart"] * n),
        "parent_sample": pa.nulls(n, pa.int32()),
        "attempt": pa.array(k),
        "selected": pa.array(np.ones(n, bool)),
        "intermediate_layers": pa.array([[]] * n, pa.list_(pa.string())),
        "intermediate_radius": pa.nulls(n, pa.float64()),
        "steps_run": pa.array(np.where(bad, 0, 100).astype(np.int32)),
        "best_step": pa.array(np.where(bad, 0, 97).astype(np.int32)),
        "final_l2": pa.array(l2),
        "final_geocross": pa.array(l2 * 3),
        "final_total": pa.array(l2 * 4),
        "converged": pa.array(~bad & (l2 < 5e-3)),
        "eps": pa.array(np.full(n, 2e-3)),
        "output_key": pa.array(outputs, pa.string()),
        "lr_check_key": pa.array(lr_checks, pa.string()),
        "seconds": pa.array(rng.uniform(5, 50, n)),
        "device": pa.array(["cuda:0"] * n),
        "status": pa.array(np.where(bad, "failed", "ok").tolist()),
        "error": pa.array(
            [("search failed: CUDA out of memory" if b else None) for b in bad], pa.string()
        ),
        "created_at": pa.array([created] * n, pa.timestamp("us", tz="UTC")),
    }
    # Columns not set above (the face columns: these are whole inputs) are null.
    arrays = [columns.get(f.name, pa.array([None] * n, f.type)) for f in SAMPLES_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SAMPLES_SCHEMA)


# --------------------------------------------------------------------------------------------
# The algorithm discovery had before issue 9 (for --baseline and as the tests' reference)


@dataclass
class BaselineDiscovery:
    pending: list[str]
    total: int
    done: int
    collisions: dict[str, str] = field(default_factory=dict)


def baseline_discover(
    source: Storage,
    dest: Storage,
    samples: int,
    *,
    force: bool = False,
    limit: int | None = None,
) -> BaselineDiscovery:
    """`discover` as it was: every key in a list, the whole index, every PNG of dest in a set.

    The done rule: a current "no-faces" row, or for every face_index among the input's current
    rows with sample < samples (None = the input restored whole), "ok" rows for samples
    0..samples-1 whose PNGs exist.
    """
    from pulse_core.manifest import read_index
    from pulse_core.pipeline import IMAGE_SUFFIXES, find_collisions

    keys = _inputs_only(sorted(o.key for o in source.list(suffixes=IMAGE_SUFFIXES)), source, dest)
    collisions = find_collisions(keys)
    done: set[str] = set()
    if not force:
        index = read_index(dest)
        if index.num_rows:
            existing = {o.key for o in dest.list(suffixes=(".png",))}
            ok: dict[tuple[str, int | None], set[int]] = {}
            faces: dict[str, set[int | None]] = {}
            no_faces: set[str] = set()
            for row in index.select(
                ["input_key", "face_index", "sample_index", "status", "output_key"]
            ).to_pylist():
                key, face, k = row["input_key"], row["face_index"], row["sample_index"]
                if 0 <= k < samples:
                    faces.setdefault(key, set()).add(face)
                    if row["status"] == "no-faces":
                        no_faces.add(key)
                if row["status"] == "ok" and row["output_key"] in existing:
                    ok.setdefault((key, face), set()).add(k)
            wanted = set(range(samples))
            done = no_faces | {
                key
                for key, fs in faces.items()
                if all(wanted <= ok.get((key, f), set()) for f in fs)
            }
    pending = [k for k in keys if k not in done]
    if limit is not None:
        pending = pending[:limit]
    return BaselineDiscovery(
        pending=pending, total=len(keys), done=len(done & set(keys)), collisions=collisions
    )


def _inputs_only(keys: list[str], source: Storage, dest: Storage) -> list[str]:
    from pulse_core.pipeline import RESERVED_PREFIXES
    from pulse_core.render import FACE_FOLDER, OUTPUT_NAME, output_base

    src, dst = source.url.rstrip("/"), dest.url.rstrip("/")
    if dst.startswith(src + "/"):
        inside = dst[len(src) + 1 :] + "/"
        return [k for k in keys if not k.startswith(inside)]
    if dst != src:
        return keys
    keys = [k for k in keys if not k.startswith(RESERVED_PREFIXES)]
    bases = {output_base(k) for k in keys if not OUTPUT_NAME.match(k.rpartition("/")[2])}

    def is_output(key: str) -> bool:
        folder, _, name = key.rpartition("/")
        if not OUTPUT_NAME.match(name):
            return False
        face = FACE_FOLDER.match(folder)  # `<folder>/face-<i>/`: a photo's face outputs
        return folder in bases or (face is not None and (face["parent"] or "") in bases)

    return [k for k in keys if not is_output(k)]


# --------------------------------------------------------------------------------------------
# Measuring: one fresh process per measurement


def rss_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def measure(algorithm: str, dest: Path, inputs: int, samples: int) -> dict[str, Any]:
    """Run one discovery in this process (a fresh one): seconds, peak RSS, the answer."""
    import pulse_core.pipeline as pipeline  # imports torch: part of the process, not the run

    archive = Archive(inputs, samples)
    source, store = ListedSource(archive), RestoredDest(dest, archive)
    run = pipeline.discover if algorithm == "new" else baseline_discover
    before = rss_bytes()
    started = time.perf_counter()
    found = run(source, store, samples)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "algorithm": algorithm,
        "seconds": seconds,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "increase_bytes": peak - before,
        "total": found.total,
        "done": found.done,
        "pending": len(found.pending),
        "collisions": len(found.collisions),
    }


def measure_in_subprocess(algorithm: str, dest: Path, inputs: int, samples: int) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        algorithm,
        "--dest",
        str(dest),
        "--inputs",
        str(inputs),
        "--samples",
        str(samples),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{algorithm} measurement failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    archive = Archive(args.inputs, args.samples)
    work = Path(tempfile.mkdtemp(prefix="pulse-discovery-"))
    try:
        dest = work / "dest"
        started = time.perf_counter()
        index = write_index(dest, archive)
        setup_seconds = time.perf_counter() - started
        expected = archive.expected()
        print(
            f"index: {index['rows']:,} rows in {index['parts']} parts, "
            f"{sum(f.stat().st_size for f in dest.rglob('*.parquet')) / MiB:.0f} MiB, "
            f"written in {setup_seconds:.0f} s",
            file=sys.stderr,
        )
        runs = []
        algorithms = ["new", "baseline"] if args.baseline else ["new"]
        for repeat in range(args.repeats):
            for algorithm in algorithms:
                r = measure_in_subprocess(algorithm, dest, args.inputs, args.samples)
                r["repeat"] = repeat
                r["correct"] = all(r[k] == v for k, v in expected.items())
                runs.append(r)
                print(
                    f"{algorithm:8s} {r['seconds']:6.1f} s, peak RSS {r['peak_rss_bytes'] / GiB:.2f}"
                    f" GiB (+{r['increase_bytes'] / GiB:.2f} GiB over {r['rss_before_bytes'] / MiB:.0f}"
                    f" MiB before), done {r['done']:,} pending {r['pending']:,}"
                    f" {'correct' if r['correct'] else 'WRONG'}",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    new = [r for r in runs if r["algorithm"] == "new"]
    peak = max(r["peak_rss_bytes"] for r in new)
    return {
        "inputs": args.inputs,
        "samples": args.samples,
        "index_rows": index["rows"],
        "index_parts": index["parts"],
        "index_setup_seconds": setup_seconds,
        "expected": expected,
        "runs": runs,
        "target_peak_gib": TARGET_PEAK_GIB,
        "passed": all(r["correct"] for r in runs) and peak < TARGET_PEAK_GIB * GiB,
        "machine": {
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000, help="keys in the source listing")
    p.add_argument("--samples", type=int, default=4, help="samples per input (index rows each)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_INPUTS:,} inputs (tests)")
    p.add_argument("--baseline", action="store_true", help="also measure the earlier algorithm")
    p.add_argument("--repeats", type=int, default=1, help="measurements of each algorithm")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--child", choices=("new", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.dest, args.inputs, args.samples)))
        return 0
    if args.quick:
        args.inputs = QUICK_INPUTS
    result = run_bench(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "PASS" if result["passed"] else "FAIL"
    peak = max(r["peak_rss_bytes"] for r in result["runs"] if r["algorithm"] == "new")
    print(
        f"{verdict}: discovery of {args.inputs:,} keys against {result['index_rows']:,} index rows"
        f" peaks at {peak / GiB:.2f} GiB (target < {TARGET_PEAK_GIB:.0f} GiB) and is "
        f"{'correct' if all(r['correct'] for r in result['runs']) else 'WRONG'}"
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
