"""A real external Dask cluster for integration tests (a pytest plugin module).

The cluster is what production looks like, on one machine: a `dask scheduler` and two
`dask worker` processes (each with a nanny, one thread, one worker process):
- `gpu-worker`, started with `--resources GPU=1`: the only worker that may run tasks annotated
  `resources={"GPU": 1}`, one at a time. On this CPU-only machine the "GPU" is just the resource
  tag; the tasks run on the CPU.
- `cpu-worker`, no resources: runs everything else.

With an external cluster a real Prefect server is required (the workers must report task runs to
the same API as the flow), so the fixture depends on `prefect_server` and hands its env to every
worker, with the repository root on PYTHONPATH so `tasks` and `flows` unpickle there.
Every process runs in its own process group and is stopped by PID at the end, always.

Use it from tests/conftest.py with `pytest_plugins = [..., "tests.prefect_server",
"tests.dask_cluster"]`, then ask for the module-scoped `dask_cluster` fixture.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infra.processes import (
    LoggedProcess,
    dask_scheduler_command,
    dask_worker_command,
    dask_workers_ready,
    find_executable,
    free_port,
    require_executable,
    start_process,
    stop_process,
    tail,
    wait_until,
)
from tests.prefect_server import PrefectServer

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0  # scheduler + 2 workers take about 5 s here
GPU_WORKER = "gpu-worker"
CPU_WORKER = "cpu-worker"


@dataclass(frozen=True)
class DaskWorker:
    """One worker process as the scheduler sees it."""

    name: str  # --name given at start
    address: str  # tcp://127.0.0.1:<port>, what the scheduler calls it
    pid: int  # PID of the worker process (the nanny's child), where tasks run
    resources: Mapping[str, float]  # e.g. {"GPU": 1}


@dataclass(frozen=True)
class DaskCluster:
    """A running scheduler and its workers."""

    address: str  # tcp://127.0.0.1:<port> of the scheduler
    workers: Mapping[str, DaskWorker]  # by name: GPU_WORKER, CPU_WORKER
    log_dir: Path  # scheduler.log, <worker name>.log
    pids: Mapping[str, int] = field(default_factory=dict)  # group leaders: scheduler + nannies

    @property
    def gpu_worker(self) -> DaskWorker:
        return self.workers[GPU_WORKER]

    @property
    def cpu_worker(self) -> DaskWorker:
        return self.workers[CPU_WORKER]

    @contextlib.contextmanager
    def client(self, timeout_s: float = 10.0) -> Iterator[object]:
        """A `distributed.Client` connected to the scheduler, closed on exit."""
        from distributed import Client

        client = Client(self.address, timeout=timeout_s)
        try:
            yield client
        finally:
            client.close()

    def log_tails(self, lines: int = 20) -> str:
        return "\n".join(
            f"--- {path.name}\n{tail(path, lines)}" for path in sorted(self.log_dir.glob("*.log"))
        )


def _describe_workers(address: str, names: list[str]) -> dict[str, DaskWorker]:
    """The registered workers by name: address, PID of the process running tasks, resources."""
    from distributed import Client

    with Client(address, timeout=10) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        pids = client.run(os.getpid)
    workers = {
        w["name"]: DaskWorker(
            name=w["name"],
            address=addr,
            pid=pids[addr],
            resources=dict(w.get("resources") or {}),
        )
        for addr, w in info.items()
    }
    missing = set(names) - set(workers)
    if missing:
        raise RuntimeError(f"workers {sorted(missing)} did not register; got {sorted(workers)}")
    return workers


@contextlib.contextmanager
def dask_cluster_processes(
    log_dir: Path,
    env: Mapping[str, str],
    dask: str | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[DaskCluster]:
    """Run a scheduler, `gpu-worker` (GPU=1) and `cpu-worker` on 127.0.0.1; stop all on exit."""
    dask = dask or require_executable("dask", "pip install 'dask[distributed]'")
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: dict[str, LoggedProcess] = {}
    try:
        procs["scheduler"] = start_process(
            dask_scheduler_command(dask, port), log_dir / "scheduler.log", env, cwd=log_dir
        )
        for name in (GPU_WORKER, CPU_WORKER):
            procs[name] = start_process(
                dask_worker_command(
                    dask,
                    address,
                    name,
                    log_dir / name,
                    gpu=name == GPU_WORKER,
                    death_timeout_s=60,  # exit if the scheduler is gone for a minute (no orphans)
                ),
                log_dir / f"{name}.log",
                env,
                cwd=log_dir,
            )
        # A StartupError (a RuntimeError) quotes the end of every log: scheduler and workers.
        wait_until(
            f"Dask cluster at {address} did not register its 2 workers",
            dask_workers_ready(address, 2),
            timeout_s=startup_timeout_s,
            watch=procs,
        )
        yield DaskCluster(
            address=address,
            workers=_describe_workers(address, [GPU_WORKER, CPU_WORKER]),
            log_dir=log_dir,
            pids={n: p.pid for n, p in procs.items()},
        )
    finally:
        # Workers first (they would otherwise retry the scheduler until --death-timeout).
        for name in reversed(list(procs)):
            stop_process(procs[name])


@pytest.fixture(scope="module")
def dask_cluster(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaskCluster]:
    """An external Dask cluster (scheduler + `gpu-worker` + `cpu-worker`) for one test module.

    Workers report to the session's real Prefect server; PULSE_CACHE and the other non-Prefect
    variables of this process are passed through, so they find the same model cache.
    """
    dask = find_executable("dask")
    if dask is None:
        pytest.skip("`dask` not found next to the Python interpreter or on PATH")
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = prefect_server.child_env(PYTHONPATH=pythonpath)
    with dask_cluster_processes(tmp_path_factory.mktemp("dask"), env, dask) as cluster:
        yield cluster
