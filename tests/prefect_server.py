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

Starting, waiting and stopping go through `infra.processes`, shared with infra/local_stack.py;
`find_executable`, `free_port`, `start_process`, `stop_process` and `tail` stay importable from
here for the tests that use them.

Use it from tests/conftest.py with `pytest_plugins = [..., "tests.prefect_server"]`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.processes import (
    ProcessExited,
    find_executable,
    free_port,
    http_ok,
    prefect_server_command,
    require_executable,
    start_process,
    stop_process,
    tail,
    wait_until,
)

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
# Process helpers: `infra.processes` (imported above); this module re-exports `find_executable`,
# `free_port`, `start_process`, `stop_process` and `tail` for the tests that import them here.


def child_env(updates: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its PREFECT_* settings, plus `updates`.

    Dropping the inherited PREFECT_* variables keeps a developer's profile (a cloud API URL,
    a debug logging level) out of the servers and workers that tests start.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(updates)
    return env


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


@contextlib.contextmanager
def prefect_server_process(
    home: Path,
    prefect: str | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ui: bool = False,
) -> Iterator[PrefectServer]:
    """Run `prefect server start` on a free port of 127.0.0.1; stop it on exit, always.

    ui: serve the web UI too, told where its API is (on any port but 4200 it cannot guess).
    """
    prefect = prefect or require_executable("prefect", "pip install prefect==3.8.8")
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    env = child_env(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            **QUIET_SETTINGS,
        }
    )
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        if ui:
            env["PREFECT_UI_ENABLED"] = "true"
            env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
        proc = start_process(
            prefect_server_command(prefect, port),
            log_path,
            env,
            cwd=home,
            label=f"attempt {attempt}",
        )
        server = PrefectServer(
            api_url=f"http://127.0.0.1:{port}/api", home=home, log_path=log_path, pid=proc.pid
        )
        try:
            try:
                wait_until(
                    f"prefect server did not answer {server.health_url}",
                    lambda url=server.health_url: http_ok(url),
                    timeout_s=startup_timeout_s,
                    watch={"prefect server": proc},
                )
            except ProcessExited as exc:
                if attempt < START_ATTEMPTS and exc.port_taken:
                    continue  # `finally` below stops it; go again on a fresh port
                raise
            yield server
            return
        finally:
            stop_process(proc, STOP_TIMEOUT_S)
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
