"""A real Prefect server for integration tests (a pytest plugin module).

The temporary API that Prefect starts on the first flow call is enough for flows that run in one
process; it is not enough once work leaves the process: Dask workers of an external cluster and
Prefect workers running deployments must all talk to one server (see docs stack notes, "Dask").
This plugin runs `prefect server start` on a free port of 127.0.0.1 with its own PREFECT_HOME
(SQLite database inside it), telemetry and UI off, and stops it by PID (its process group) at the
end of the session, always.

Fixtures:
- `prefect_server` (session): the running server; `server.env()` is what a child process needs.
- `prefect_api` (function): the same server, with this process's Prefect settings pointed at it
  for the duration of one test (so flows called in the test run against it).

Helpers for other plugins: `free_port`, `start_process`, `stop_process` (process groups, logs).

Use it from tests/conftest.py with `pytest_plugins = [..., "tests.prefect_server"]`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 90.0  # about 9 s on a 2-core machine; generous for a loaded CI runner
STOP_TIMEOUT_S = 15.0  # SIGTERM grace before SIGKILL
START_ATTEMPTS = 3  # fresh port per attempt: a free port can be taken between choice and bind

# Settings every Prefect process in a test session gets (server, CLI, workers, Dask workers).
QUIET_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry calls offline
    "PREFECT_UI_ENABLED": "false",  # API only: faster start, nothing to serve
    "PREFECT_CLI_PROMPT": "false",  # a CLI call never waits for a keyboard
}


# --------------------------------------------------------------------------------------------
# Process helpers (also used by tests.dask_cluster)


def find_executable(name: str) -> str | None:
    """A console script next to this interpreter (venv bin/) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller retries if it is taken before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def child_env(updates: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its PREFECT_* settings, plus `updates`.

    Dropping the inherited PREFECT_* variables keeps a developer's profile (a cloud API URL,
    a debug logging level) out of the servers and workers that tests start.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(updates)
    return env


def start_process(
    cmd: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `cmd` in a new session (its own process group), stdout + stderr appended to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n--- {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop a process started by `start_process` and everything in its group.

    SIGTERM to the group (a Dask nanny and its worker, a Prefect worker and its flow runs),
    wait, then SIGKILL to the group; leftovers of the group are killed even after a clean exit.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    # The group id is the leader's PID (start_new_session): children it left behind go too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class PrefectServer:
    """A running Prefect server: where its API is and how a client process reaches it."""

    api_url: str  # http://127.0.0.1:<port>/api
    home: Path  # PREFECT_HOME of the server and of every client the tests start
    log_path: Path  # stdout + stderr of `prefect server start`
    pid: int  # the server's PID, also its process group id

    @property
    def health_url(self) -> str:
        return f"{self.api_url}/health"

    def env(self) -> dict[str, str]:
        """Environment variables a child process (CLI, worker, Dask worker) needs to use it."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            **QUIET_SETTINGS,
        }

    def child_env(self, **extra: str) -> dict[str, str]:
        """A full environment for a child process: os.environ without PREFECT_*, plus env()."""
        return child_env({**self.env(), **extra})

    @contextlib.contextmanager
    def settings(self) -> Iterator[PrefectServer]:
        """Point this process's Prefect settings (clients, flows called here) at the server.

        Settings are read from a context, not from os.environ, once Prefect is imported:
        `temporary_settings` is the supported way to change them for a block of code.
        """
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url, PREFECT_HOME: self.home}):
            try:
                yield self
            finally:
                # Send queued logs and events while the server is known to be up: queued for
                # after the server stops, they would be retried at interpreter exit (a minute
                # of "Error logging to API") and lost.
                drain_prefect_workers()

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)


def drain_prefect_workers() -> None:
    """Flush this process's Prefect log and event workers to the API they were sending to."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):  # never started: nothing queued
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class _StartupExited(RuntimeError):
    """The server died while starting (often: the port was taken after we chose it)."""


def _wait_healthy(server: PrefectServer, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _healthy(server.health_url):
        if proc.poll() is not None:
            raise _StartupExited(
                f"prefect server exited with code {proc.returncode} during startup; "
                f"last log lines ({server.log_path}):\n{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"prefect server did not answer {server.health_url} within {timeout_s:.0f} s; "
                f"last log lines ({server.log_path}):\n{server.log_tail()}"
            )
        time.sleep(0.25)


@contextlib.contextmanager
def prefect_server_process(
    home: Path,
    prefect: str | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[PrefectServer]:
    """Run `prefect server start` on a free port of 127.0.0.1; stop it on exit, always."""
    prefect = prefect or find_executable("prefect")
    if prefect is None:
        raise FileNotFoundError("`prefect` not found: pip install prefect==3.8.8")
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    database_url = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        env = child_env(
            {
                "PREFECT_HOME": str(home),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
                **QUIET_SETTINGS,
            }
        )
        cmd = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        proc = start_process(cmd, log_path, env, cwd=home)
        server = PrefectServer(
            api_url=f"http://127.0.0.1:{port}/api", home=home, log_path=log_path, pid=proc.pid
        )
        try:
            try:
                _wait_healthy(server, proc, startup_timeout_s)
            except _StartupExited:
                if attempt < START_ATTEMPTS and "address already in use" in server.log_tail(200):
                    continue  # `finally` below stops it; go again on a fresh port
                raise
            yield server
            return
        finally:
            stop_process(proc)
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One real Prefect server (API only, SQLite) for the whole test session.

    Tests share it: each should name what it creates (work pools, variables, deployments)
    so that it does not depend on what other tests left there.
    """
    prefect = find_executable("prefect")
    if prefect is None:
        pytest.skip("`prefect` not found next to the Python interpreter or on PATH")
    with prefect_server_process(tmp_path_factory.mktemp("prefect-home"), prefect) as server:
        yield server


@pytest.fixture
def prefect_api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """The session's Prefect server, with this process's Prefect settings pointed at it."""
    with prefect_server.settings():
        yield prefect_server
