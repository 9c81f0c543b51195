"""A run killed outright: the next run adopts what it left and Prefect stops showing it Running.

Operator scenario: `pulse run` against a real Prefect server is SIGKILLed mid-run (an OOM kill,
a lost node). Its finished batches wrote PNGs, manifest parts and index parts; its flow run is
left Running. The next run of the same dest must: merge the dead run's parts into its run
manifest (so every index row's run id has a run manifest), mark the dead flow run Crashed with
the reason, and restore the rest, every input exactly once in the index.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from PIL import Image

from pulse_core.lease import LeaseRecord, RunLease, read_leases, runs_to_adopt
from pulse_core.storage import LocalStorage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"


def _inputs(folder: Path, count: int) -> Path:
    folder.mkdir()
    base = Image.open(EXAMPLES / "grace-hopper-8.png").convert("RGB")
    for i in range(count):
        base.rotate(90 * (i % 4)).save(folder / f"face-{i:02d}.png")
    return folder


def _start_run(server, source: Path, dest: Path, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pulse_cli.main", "run", str(source), str(dest)]
    argv += ["--preset", "reference", "--steps", "40", "--samples", "1", "--inputs-per-task", "1"]
    return subprocess.Popen(
        argv,
        env=server.child_env(PYTHONUNBUFFERED="1"),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_parts(dest: Path, proc: subprocess.Popen, log: Path, parts: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = list(dest.glob("_runs/*/parts/samples-*.parquet"))
        if len(found) >= parts:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before it was killed:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no batch finished in time:\n{log.read_text()[-3000:]}")


def test_a_killed_run_is_adopted_and_marked_crashed_by_the_next(
    prefect_server, demo_generator, tmp_path
):
    from prefect import get_client

    source, dest = _inputs(tmp_path / "source", 8), tmp_path / "dest"
    log = tmp_path / "first.log"
    first = _start_run(prefect_server, source, dest, log)
    try:
        _wait_for_parts(dest, first, log, parts=2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    (dead,) = read_leases(LocalStorage(dest))
    assert dead.finished is None  # it never got to say goodbye
    dead_parts = list(dest.glob(f"_runs/{dead.run_id}/parts/*.parquet"))
    assert dead_parts

    argv = [sys.executable, "-m", "pulse_cli.main", "run", str(source), str(dest), "--json"]
    second = subprocess.run(
        [*argv, "--preset", "reference", "--steps", "3", "--samples", "1"],
        env=prefect_server.child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)

    # The dead run's parts are merged into its own manifest; nothing is left in parts/.
    assert not list(dest.glob(f"_runs/{dead.run_id}/parts/*.parquet"))
    assert (dest / "_runs" / dead.run_id / "samples.parquet").is_file()
    index = ds.dataset(dest / "_manifest" / "samples", format="parquet").to_table()
    for run_id in set(index.column("run_id").to_pylist()):
        assert (dest / "_runs" / run_id / "samples.parquet").is_file(), run_id
    # Every input exactly once, all restored; the dead run's finished inputs were not redone.
    keys = index.column("input_key").to_pylist()
    assert sorted(keys) == sorted(p.name for p in source.iterdir())
    assert summary["skipped"] >= 1 and summary["ok"] + summary["skipped"] == 8
    # Prefect shows the dead run as Crashed, with the reason.
    with prefect_server.settings(), get_client(sync_client=True) as client:
        state = client.read_flow_run(uuid.UUID(dead.run_id)).state
    assert state is not None and state.type.value == "CRASHED", state
    assert "adopted by run" in (state.message or "")
    lease = next(x for x in read_leases(LocalStorage(dest)) if x.run_id == dead.run_id)
    assert lease.finished == "crashed" and lease.adopted_by == summary["run_id"]


def test_a_live_run_is_never_adopted(tmp_path):
    dest = LocalStorage(tmp_path)
    dest.check(create=True)
    with RunLease(dest, "live-run", heartbeat_s=0.1):
        time.sleep(0.3)
        assert runs_to_adopt(dest, "another-run") == []
    (done,) = read_leases(dest)
    assert done.finished == "completed" and runs_to_adopt(dest, "another-run") == []


def test_a_lease_from_another_host_is_stale_only_after_its_heartbeat_ages():
    now_iso = "2026-12-02T03:00:00+00:00"
    lease = LeaseRecord("r", "elsewhere", 1, now_iso, now_iso)
    heartbeat = lease.heartbeat()
    assert not lease.is_stale(heartbeat + timedelta(minutes=9), timedelta(minutes=10))
    assert lease.is_stale(heartbeat + timedelta(minutes=11), timedelta(minutes=10))


def test_a_failed_run_is_adopted_once(tmp_path):
    dest = LocalStorage(tmp_path)
    dest.check(create=True)
    with pytest.raises(RuntimeError), RunLease(dest, "failed-run"):
        raise RuntimeError("storage went away")
    (lease,) = runs_to_adopt(dest, "next-run")
    assert lease.finished == "failed" and "storage went away" in lease.message

    from pulse_core.lease import adopt_crashed_runs

    adoption = adopt_crashed_runs(dest, "next-run")
    assert [x.run_id for x in adoption.leases] == ["failed-run"] and adoption.problems == []
    assert runs_to_adopt(dest, "run-after") == []
