"""restore_archive on an external Dask cluster, reporting to a real Prefect server.

The cluster (tests/dask_cluster.py) has a `gpu-worker` (resource GPU=1) and a `cpu-worker`;
restore batches are annotated `resources={"GPU": 1}`, so all of them must land on the first.
The generator is cached per worker process: however many batches a worker runs, it loads the
model once, and a second run on the same workers loads nothing new.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tests.helpers import run_restore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES_LR = Path(__file__).resolve().parent.parent / "examples" / "lr"
FAST = {"steps": 3, "samples": 1, "inputs_per_task": 1}  # 3 search steps: seconds, not minutes


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A folder with the four example LR faces (8x8 and 16x16)."""
    folder = tmp_path / "source"
    folder.mkdir()
    for path in sorted(EXAMPLES_LR.glob("*.png")):
        shutil.copy(path, folder / path.name)
    assert len(list(folder.iterdir())) == 4
    return folder


def _outputs(dest: Path) -> set[str]:
    """Input stems with a restored sample in dest (manifests under _runs/ are not outputs)."""
    return {p.parent.name for p in dest.glob("*/sample-*.png")}


def test_batches_run_only_on_the_gpu_worker_with_one_model_load(
    prefect_api, dask_cluster, demo_generator, source: Path, tmp_path: Path
):
    dest = tmp_path / "dest"

    summary = run_restore(
        source=str(source),
        dest=str(dest),
        task_runner="dask",
        dask_address=dask_cluster.address,
        **FAST,
    )

    stems = {p.stem for p in source.iterdir()}
    assert (summary.ok, summary.failed, summary.skipped) == (4, 0, 0), summary.failures
    assert _outputs(dest) == stems
    gpu_worker = f"{socket.gethostname()}:{dask_cluster.gpu_worker.pid}"
    # Four batches, one worker process, one load of the generator there.
    assert summary.workers == {gpu_worker: 1}, dask_cluster.log_tails()


def test_a_second_run_reuses_the_model_loaded_by_the_first(
    prefect_api, dask_cluster, demo_generator, source: Path, tmp_path: Path
):
    dest = tmp_path / "dest"
    run = {"source": str(source), "dest": str(dest), "task_runner": "dask", **FAST}

    first = run_restore(dask_address=dask_cluster.address, **run)
    second = run_restore(dask_address=dask_cluster.address, force=True, **run)

    assert first.ok == second.ok == 4
    assert first.workers == second.workers  # same process, still one load
    assert set(second.workers.values()) == {1}
