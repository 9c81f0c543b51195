"""Specs for discovery and planning at archive scale (issue 9, "Scale").

Discovery streams listings and reads the index part by part; its answer must be exactly the one
the simple algorithm gives (every key in a list, `read_index`, every PNG of dest in a set: kept
as `bench.discovery_scale.baseline_discover`). The fan-out keeps a bounded number of batches in
flight. The bench's quick mode runs here so it never rots, and a 2,000-image run through the
real flow shows every image accounted for exactly once.
"""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pulse_core.pipeline as pipeline
from bench.discovery_scale import (
    Archive,
    ListedSource,
    RestoredDest,
    baseline_discover,
    write_index,
)
from pulse_core.manifest import RowContext, append_to_index, failed_rows, samples_table
from pulse_core.pipeline import BatchOutcome, InputOutcome, KeyList, discover
from pulse_core.storage import LocalStorage, ObjectInfo, Storage, open_storage

REPO_ROOT = Path(__file__).resolve().parent.parent


def same_answer(source: Storage, dest: Storage, samples: int, **kwargs: Any) -> None:
    """discover and the simple algorithm agree on everything the flow uses."""
    found = discover(source, dest, samples, **kwargs)
    expected = baseline_discover(source, dest, samples, **kwargs)
    assert list(found.pending) == expected.pending
    assert (found.total, found.done) == (expected.total, expected.done)
    assert found.collisions == expected.collisions


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny listing chunks and match blocks, so small cases cross every block boundary."""
    monkeypatch.setattr(pipeline, "LIST_CHUNK", 7)
    monkeypatch.setattr(pipeline, "MATCH_ROWS", 50)


# --------------------------------------------------------------------------------------------
# Local folders: a small archive with everything discovery must get right


def touch(root: Path, *keys: str) -> None:
    for key in keys:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@dataclass
class Writer:
    """One batch of one run writing index rows (a part), as process_batch does."""

    run_id: str
    created_at: datetime

    def rows(
        self, dest: Path, key: str, samples: int, *, failed: bool = False, png: bool = True
    ) -> list[dict[str, Any]]:
        ctx = RowContext(self.run_id, "tiny", "c" * 64, 0.01, "cpu", self.created_at)
        if failed:
            return failed_rows(ctx, key, "cannot decode", samples)
        out = []
        for k in range(samples):
            hr = pipeline.sample_keys(key, k)[0]
            if png:
                touch(dest, hr)
            out.append(
                {
                    "run_id": self.run_id,
                    "input_key": key,
                    "generator_id": "tiny",
                    "seed": k,
                    "sample_index": k,
                    "method": "restart",
                    "converged": True,
                    "eps": 0.01,
                    "output_key": hr,
                    "status": "ok",
                    "created_at": self.created_at,
                }
            )
        return out


T0 = datetime(2026, 12, 1, tzinfo=UTC)


def write_part(dest: Path, name: str, rows: list[dict[str, Any]]) -> None:
    append_to_index(LocalStorage(dest), samples_table(rows), name, reconcile=False)


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, Path]:
    """Source with done, failed, partial, re-run and new inputs; dest with its index and PNGs."""
    source, dest = tmp_path / "source", tmp_path / "dest"
    keys = [f"{d}/img-{i:02d}.{ext}" for d in ("a", "b", "c") for i in range(8) for ext in ["png"]]
    touch(source, *keys, "a/img-00.jpg", "b/img-03.webp", "top.gif", "d/x.png")  # 2 collisions
    run1, run2 = Writer("run-1", T0), Writer("run-2", T0 + timedelta(hours=1))
    rows: list[dict[str, Any]] = []
    for i, key in enumerate(keys):
        rows += run1.rows(dest, key, 2, failed=i % 5 == 0, png=i % 7 != 3)
    rows += run1.rows(dest, "gone/old.png", 2)  # no longer in source
    write_part(dest, "run-1-00000", rows)
    rows = run2.rows(dest, "a/img-00.png", 2)  # failed in run 1, restored in run 2: done
    rows += run2.rows(dest, "a/img-01.png", 2, failed=True)  # a newer failure: success stays
    rows += run2.rows(dest, "b/img-04.png", 1)  # redone with 1 sample: not done for 2
    write_part(dest, "run-2-00000", rows)  # not reconciled: the rule decides
    extra = Writer("run-3", T0 + timedelta(hours=2)).rows(dest, "c/img-04.png", 3)
    extra[2]["output_key"] = "elsewhere/c-img-04-2.png"  # an "ok" row with a key not derived
    touch(dest, "elsewhere/c-img-04-2.png")
    write_part(dest, "run-3-00000", extra)
    return source, dest


@pytest.mark.parametrize("samples", [1, 2, 3])
def test_discover_matches_the_simple_algorithm(
    archive: tuple[Path, Path], samples: int, small_blocks: None
) -> None:
    source, dest = archive
    same_answer(open_storage(str(source)), open_storage(str(dest)), samples)


@pytest.mark.parametrize("limit", [0, 1, 5, 1000, -2])
def test_limit_keeps_the_first_pending_keys_like_a_list_slice(
    archive: tuple[Path, Path], limit: int
) -> None:
    source, dest = archive
    same_answer(open_storage(str(source)), open_storage(str(dest)), 2, limit=limit)


def test_force_makes_every_input_pending(archive: tuple[Path, Path]) -> None:
    source, dest = archive
    src, dst = open_storage(str(source)), open_storage(str(dest))
    same_answer(src, dst, 2, force=True)
    assert discover(src, dst, 2, force=True).done == 0


def test_collisions_name_the_first_key_of_each_output_folder(archive: tuple[Path, Path]) -> None:
    source, dest = archive
    found = discover(open_storage(str(source)), open_storage(str(dest)), 2)
    assert found.collisions == {"a/img-00.png": "a/img-00.jpg", "b/img-03.webp": "b/img-03.png"}


def test_outputs_in_a_dest_inside_source_are_not_inputs(
    archive: tuple[Path, Path], small_blocks: None
) -> None:
    source, dest = archive
    inner = source / "restored"
    dest.rename(inner)
    found = discover(open_storage(str(source)), open_storage(str(inner)), 2)
    assert not any(k.startswith("restored/") for k in found.pending)
    same_answer(open_storage(str(source)), open_storage(str(inner)), 2)


def test_dest_equal_to_source_skips_outputs_and_manifests(
    tmp_path: Path, small_blocks: None
) -> None:
    root = tmp_path / "archive"
    inputs = ["p.png", "p.b.png", "q", "q.x.png", "r.jpg", "s/t.png", ".png", "u."]
    touch(root, *inputs)
    writer = Writer("run-1", T0)
    rows: list[dict[str, Any]] = []
    for key in ["p.png", "p.b.png", "q.x.png", "r.jpg", "s/t.png"]:
        rows += writer.rows(root, key, 2)  # PNGs land in each input's own folder, in source
    rows += writer.rows(root, "q", 2, png=False)  # a file "q" leaves no room for a folder "q/"
    touch(root, "p/sheet.png", "p/sample-0-lr.png", "sample-0.png", "v/sample-0.png")
    write_part(root, "run-1-00000", rows)
    store = open_storage(str(root))
    found = discover(store, store, 2)
    assert "p/sample-0.png" not in list(found.pending)
    assert "v/sample-0.png" in list(found.pending)  # no input "v.<ext>": an input itself
    same_answer(store, store, 2)


class ShuffledListing(LocalStorage):
    """A store that lists out of key order (as S3 directory buckets do)."""

    def list(self, prefix: str = "", suffixes: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
        listed = list(super().list(prefix, suffixes))
        random.Random(7).shuffle(listed)
        return iter(listed)


def test_a_listing_out_of_key_order_gives_the_same_answer(
    tmp_path: Path, small_blocks: None
) -> None:
    root = tmp_path / "archive"
    inputs = [f"f{i % 3}/img{i:02d}.png" for i in range(20)]
    touch(root, *inputs)
    rows: list[dict[str, Any]] = []
    for key in inputs[::2]:
        rows += Writer("run-1", T0).rows(root, key, 1)
    write_part(root, "run-1-00000", rows)
    store = ShuffledListing(root)
    found = discover(store, store, 1)
    assert list(found.pending) == sorted(found.pending)
    same_answer(store, store, 1)
    same_answer(open_storage(str(root)), open_storage(str(root)), 1)


def test_empty_source_and_empty_index(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "d").mkdir()
    src, dst = open_storage(str(tmp_path / "s")), open_storage(str(tmp_path / "d"))
    found = discover(src, dst, 4)
    assert (list(found.pending), found.total, found.done, found.collisions) == ([], 0, 0, {})


# --------------------------------------------------------------------------------------------
# The bench's archive: streamed source, real Parquet index, listed-only PNGs


def test_discover_on_a_streaming_archive_matches_the_simple_algorithm(
    tmp_path: Path, small_blocks: None
) -> None:
    archive = Archive(inputs=3_000, samples=2)
    write_index(tmp_path, archive)
    source, dest = ListedSource(archive), RestoredDest(tmp_path, archive)
    found = discover(source, dest, archive.samples)
    expected = archive.expected()
    assert (found.total, found.done, len(found.pending)) == (
        expected["total"],
        expected["done"],
        expected["pending"],
    )
    same_answer(source, dest, archive.samples)
    same_answer(source, dest, archive.samples, limit=10)


def test_pending_keys_are_held_as_arrow_and_slice_into_lists() -> None:
    keys = KeyList(["a.png", "b.png", "c.png", "d.png", "e.png"])
    assert keys[1:3] == ["b.png", "c.png"] and isinstance(keys[1:3], list)
    assert keys[-1] == "e.png" and keys[::2] == ["a.png", "c.png", "e.png"]
    assert list(keys.batches(2)) == [["a.png", "b.png"], ["c.png", "d.png"], ["e.png"]]
    assert keys == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert pickle.loads(pickle.dumps(keys)) == keys
    with pytest.raises(IndexError):
        keys[5]


@pytest.mark.slow
def test_bench_quick_mode_runs_and_agrees_with_the_baseline(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    done = subprocess.run(
        [sys.executable, "bench/discovery_scale.py", "--quick", "--baseline", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    import json

    result = json.loads(out.read_text())
    assert [r["algorithm"] for r in result["runs"]] == ["new", "baseline"]
    assert all(r["correct"] for r in result["runs"])


# --------------------------------------------------------------------------------------------
# The fan-out: a bounded number of batches in flight (real Prefect flow, real thread runner)


class InFlight:
    """Counts batches submitted and not yet finished, around the flow's real `restore_batch`."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.lock = threading.Lock()
        self.now = self.most = self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.now += 1
            self.submitted += 1
            self.most = max(self.most, self.now)
        future = self.task.submit(*args, **kwargs)
        future.wrapped_future.add_done_callback(self._finished)  # before the flow's callback
        return future

    def _finished(self, _: Any) -> None:
        with self.lock:
            self.now -= 1


def fake_batch(running: dict[str, int], lock: threading.Lock) -> Any:
    """A `process_batch` that only sleeps and counts how many run at once."""

    def process_batch(input_keys: list[str], *args: Any, batch_id: str, **kwargs: Any):
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep(0.05)
        with lock:
            running["now"] -= 1
        inputs = [InputOutcome(k, "ok", None, 1, 1, 0.0, [f"{k}/sample-0.png"]) for k in input_keys]
        return BatchOutcome(batch_id, inputs, 0.05, "test:0", 1, "cpu", "fake", "")

    return process_batch


def run_batches(batches: list[list[str]], tmp_path: Path, workers: int, **kwargs: Any) -> Any:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.restore import restore_batches
    from pulse_core.pipeline import write_plan
    from pulse_core.settings import RestoreSettings

    store = open_storage(str(tmp_path))
    size = len(batches[0])
    assert all(len(b) == size for b in batches), "a plan is cut into equal batches"
    plan = write_plan(store, "run-1", [k for b in batches for k in b])
    flow = restore_batches.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
    return flow(plan, store, store, RestoreSettings(), "run-1", size, {}, False, None, **kwargs)


@pytest.mark.integration
def test_no_more_batches_run_at_once_than_the_bound(
    temporary_prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.restore

    running, lock = {"now": 0, "most": 0}, threading.Lock()
    monkeypatch.setattr(tasks.restore, "process_batch", fake_batch(running, lock))
    batches = [[f"img-{b:02d}-{i}.png" for i in range(3)] for b in range(24)]
    tally = run_batches(batches, tmp_path, workers=16, max_in_flight=3)
    assert (tally.batches, tally.attempted, tally.ok) == (24, 72, 72)
    assert sorted(i.input_key for i in tally.inputs) == sorted(k for b in batches for k in b)
    assert running["most"] == 3  # 16 threads were free: the bound alone held them back


@pytest.mark.integration
def test_the_default_bound_is_four_batches_per_worker(
    temporary_prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.restore
    import tasks.restore

    running, lock = {"now": 0, "most": 0}, threading.Lock()
    monkeypatch.setattr(tasks.restore, "process_batch", fake_batch(running, lock))
    counter = InFlight(flows.restore.restore_batch)
    monkeypatch.setattr(flows.restore, "restore_batch", counter)
    tally = run_batches([[f"img-{b}.png"] for b in range(30)], tmp_path, workers=2)
    assert tally.batches == counter.submitted == 30
    assert counter.most == flows.restore.IN_FLIGHT_PER_WORKER * 2
    assert running["most"] == 2


# --------------------------------------------------------------------------------------------
# 2,000 images through the real flow: each accounted for exactly once


def tiny_model(folder: Path) -> Path:
    """A random DCGAN saved as a checkpoint the loader recognises (`{"netG_state_dict": ...}`)."""
    import torch

    from tests.helpers import tiny_dcgan

    path = folder / "tiny-dcgan.pt"
    torch.save({"netG_state_dict": tiny_dcgan().state_dict()}, path)
    return path


def random_inputs(folder: Path, count: int) -> list[str]:
    """`count` distinct random 16x16 RGB PNGs in 20 folders."""
    rng = np.random.default_rng(0)
    keys = []
    for i in range(count):
        key = f"f{i % 20:02d}/img-{i:05d}.png"
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        keys.append(key)
    return sorted(keys)


@pytest.mark.slow
@pytest.mark.integration
def test_two_thousand_images_are_each_restored_exactly_once(
    temporary_prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.restore
    from tests.helpers import run_restore

    keys = random_inputs(tmp_path / "source", 2_000)
    model = tiny_model(tmp_path)
    counter = InFlight(flows.restore.restore_batch)
    monkeypatch.setattr(flows.restore, "restore_batch", counter)
    dest = tmp_path / "dest"
    summary = run_restore(
        str(tmp_path / "source"),
        str(dest),
        model=str(model),
        samples=1,
        steps=2,
        preset="reference",
        inputs_per_task=100,
        task_runner="threads",
        max_workers=2,
    )
    assert (summary.found, summary.attempted, summary.ok, summary.failed) == (2000, 2000, 2000, 0)
    assert counter.submitted == 20 and counter.most <= flows.restore.IN_FLIGHT_PER_WORKER * 2

    index = ds.dataset(dest / "_manifest" / "samples", format="parquet").to_table()
    assert index.num_rows == 2000
    assert sorted(index.column("input_key").to_pylist()) == keys  # each once, none missing
    runs = list((dest / "_runs").glob("*/samples.parquet"))
    assert len(runs) == 1
    manifest = pq.read_table(runs[0])
    assert sorted(manifest.column("input_key").to_pylist()) == keys
    assert sum(1 for _ in dest.rglob("sample-0.png")) == 2000

    again = discover(open_storage(str(tmp_path / "source")), open_storage(str(dest)), 1)
    assert (again.total, again.done, len(again.pending)) == (2000, 2000, 0)
