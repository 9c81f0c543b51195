"""A Dask worker killed (SIGKILL) in the middle of a batch: the run still completes, exactly once.

The cluster is the real one of tests/dask_cluster.py: an external scheduler, a `gpu-worker`
(GPU=1, the only worker restore batches may run on) and a `cpu-worker`, each under a nanny,
reporting to a real Prefect server. The test kills the worker process (not its nanny) while it
runs a batch, as the kernel's OOM killer or a dying GPU node would. What must follow:
- the nanny starts a new worker process; the scheduler, which saw the worker vanish with the
  task in flight, runs the task again there (Dask allows a task 3 such losses before it
  declares it failed with `KilledWorker`);
- the flow completes; every input is restored, and the run's manifest and the dest index hold
  each input exactly once: the killed attempt wrote nothing (its outputs and manifest parts are
  written at the end of the batch, under keys derived from the input, so a re-run overwrites).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.helpers import run_restore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES_LR = Path(__file__).resolve().parent.parent / "examples" / "lr"
# 600 steps on 2 inputs: ~8 s per batch alone, ~17 s on the test worker (measured), so a kill
# 2 s into a batch lands in the search, long before its outputs are written. Two batches.
RUN = {"steps": 600, "samples": 1, "preset": "reference", "inputs_per_task": 2}
KILL_AFTER_S = 2.0  # into the batch: past the model load, well before the end of the search


class WorkerKiller(threading.Thread):
    """SIGKILLs the gpu worker once it has run a batch for KILL_AFTER_S seconds, mid-batch."""

    def __init__(self, cluster: Any, dest: Path) -> None:
        super().__init__(name="worker-killer", daemon=True)
        self.cluster = cluster
        self.dest = dest
        self.victim = cluster.gpu_worker
        self.killed_task: str | None = None
        self.parts_when_started: int | None = None
        self.parts_when_killed: int | None = None
        self.error: BaseException | None = None

    def parts(self) -> int:
        return len(list((self.dest / "_manifest" / "samples").glob("part-*.parquet")))

    def run(self) -> None:
        try:
            with self.cluster.client() as client:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    running = client.processing().get(self.victim.address) or []
                    if not running:
                        time.sleep(0.1)
                        continue
                    parts = self.parts()
                    time.sleep(KILL_AFTER_S)
                    still = client.processing().get(self.victim.address) or []
                    if set(still) & set(running) and self.parts() == parts:
                        # Still running, and no batch recorded its rows meanwhile: mid-batch.
                        self.parts_when_started, self.parts_when_killed = parts, self.parts()
                        self.killed_task = str(running[0])
                        os.kill(self.victim.pid, signal.SIGKILL)
                        return
                    # A batch finished while we waited (a slow start): aim at the next one.
                raise TimeoutError("no batch on the gpu worker lasted long enough to be killed")
        except BaseException as exc:  # reported by the test
            self.error = exc


def batch_task_states(flow_run_id: str) -> list[str]:
    """States of the restore-batch task runs of a run (they belong to its nested flow run)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        parent = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[UUID(flow_run_id)])
            )
        )
        nested = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(flow_run_id)])
            )
        )
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[f.id for f in nested])
            )
        )
    batches = [t for t in [*parent, *runs] if t.name.startswith("batch ")]
    return sorted(str(t.state_type.value) for t in batches if t.state_type is not None)


def test_a_batch_whose_worker_is_killed_is_run_again_and_recorded_once(
    prefect_api, dask_cluster, demo_generator, tmp_path: Path
) -> None:
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    for path in sorted(EXAMPLES_LR.glob("*.png")):
        shutil.copy(path, source / path.name)
    inputs = sorted(p.name for p in source.iterdir())
    killer = WorkerKiller(dask_cluster, dest)

    started = time.monotonic()
    killer.start()
    summary = run_restore(
        str(source), str(dest), task_runner="dask", dask_address=dask_cluster.address, **RUN
    )
    seconds = time.monotonic() - started
    killer.join(timeout=30)

    assert killer.error is None, f"{killer.error}\n{dask_cluster.log_tails()}"
    assert killer.killed_task is not None
    assert killer.parts_when_killed == killer.parts_when_started, "killed mid-batch"
    # Completed, every input restored once, by a worker process other than the killed one.
    outcome = (summary.found, summary.ok, summary.failed)
    assert outcome == (len(inputs), len(inputs), 0), (summary.failures, summary.workers)
    # The batch in flight was run again by the nanny's new worker process.
    killed = f"{socket.gethostname()}:{dask_cluster.gpu_worker.pid}"
    assert set(summary.workers) - {killed}, (killed, summary.workers)
    for name in inputs:
        assert (dest / name.rsplit(".", 1)[0] / "sample-0.png").is_file()
    run_rows = pq.read_table(dest / "_runs" / summary.run_id / "samples.parquet")
    assert sorted(run_rows["input_key"].to_pylist()) == inputs  # the run's manifest: once each
    index = ds.dataset(dest / "_manifest" / "samples", format="parquet").to_table()
    assert sorted(index["input_key"].to_pylist()) == inputs  # the index: once each, no dedup
    assert set(index["status"].to_pylist()) == {"ok"}
    assert not list((dest / "_runs" / summary.run_id).glob("parts/*")), "parts merged"
    # What the Prefect UI shows: two batch task runs (no duplicate for the re-run), completed.
    assert batch_task_states(summary.run_id) == ["COMPLETED", "COMPLETED"]
    print(f"\nworker killed during {killer.killed_task}; run completed in {seconds:.1f} s")
