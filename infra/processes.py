"""Background processes of the running system: start, wait until ready, stop by PID.

One implementation for `infra/local_stack.py` and the test fixtures (`tests/s3_server.py`,
`tests/prefect_server.py`, `tests/dask_cluster.py`), which start the same programs (SeaweedFS
`weed mini`, `prefect server start`, `dask scheduler` / `dask worker`) the same way. Only the
standard library at import time; boto3 and distributed are imported by the checks that use them.

Design choices, and why:
- Every process starts in its own session (`start_new_session`), so its PID is also its process
  group id: stopping signals the group, which takes along what it started (a Dask nanny's worker,
  a Prefect worker's flow runs), and a Ctrl-C in the terminal that started it does not reach it.
- stdout and stderr are appended to one log file per process, each start preceded by a `---`
  banner line: the file stays small and unbuffered by us, and survives the process, so a failed
  start can quote its last lines (`StartupError` messages always do).
- Stopping is SIGTERM to the group, a bounded wait, then SIGKILL to the group, and a last SIGKILL
  to the group even after a clean exit of the leader: children it left behind must not outlive a
  test session or a `local_stack.py stop` and keep ports or GPUs busy.
- Waiting polls a readiness check (an HTTP health URL, a TCP port, signed S3 calls, registered
  Dask workers) and watches the started processes at the same time: a process that dies (often a
  port taken between choosing it and binding it) fails the wait at once, not at the timeout, as
  `ProcessExited`, which callers may retry on fresh ports.
- Ports are chosen free on 127.0.0.1 with all candidate sockets bound at once, so one call never
  returns the same port twice; another program can still take one before the server binds it,
  hence the retry above.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pulse_core.atomic import atomic_write_text

STOP_TIMEOUT_S = 15.0  # SIGTERM grace before SIGKILL (the Prefect server needs a few seconds)
POLL_INTERVAL_S = 0.25  # between two readiness checks

# Flags of `weed mini` that open a listening TCP port (checked with `weed mini -h`, 4.48). The
# admin pair comes last: its gRPC port must be admin port + 10000, whatever -admin.port.grpc
# says (its maintenance worker dials that), so `free_ports(..., paired=1)` chooses them together.
WEED_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class StartupError(RuntimeError):
    """A started process did not become ready in time; the message quotes its log."""


class ProcessExited(StartupError):
    """A process died while starting; `log_tail` tells whether a port was taken (retry)."""

    def __init__(self, message: str, returncode: int | None, log_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log_tail = log_tail

    @property
    def port_taken(self) -> bool:
        """True when the log says a port was in use: starting again on fresh ports may work."""
        return "address already in use" in self.log_tail.lower()


class LoggedProcess(subprocess.Popen[bytes]):
    """A started process that knows its log file and PID file (a `subprocess.Popen`)."""

    def __init__(
        self, args: Sequence[str], *, log_path: Path, pid_file: Path | None, **popen: Any
    ) -> None:
        super().__init__(list(args), **popen)
        self.log_path = log_path
        self.pid_file = pid_file

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)


# --------------------------------------------------------------------------------------------
# Finding programs and ports


def find_executable(name: str) -> str | None:
    """A console script next to this interpreter (a venv's bin/) first, then on PATH.

    The venv's own copy first: `prefect`, `dask` and `weed` must match the versions this
    interpreter imports, even when another copy is earlier on PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_executable(name: str, install_hint: str) -> str:
    """`find_executable(name)`, or FileNotFoundError saying how to install it."""
    found = find_executable(name)
    if found is None:
        raise FileNotFoundError(
            f"`{name}` not found next to the Python interpreter or on PATH: {install_hint}"
        )
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller retries if it is taken before use)."""
    return free_ports(1)[0]


def free_ports(count: int, paired: int = 0, offset: int = 10000) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now.

    `paired` of them are pairs (port, port + offset), placed last as [..., p1, p1 + offset]
    (see `WEED_PORT_FLAGS`). All sockets stay bound until every port is chosen, so the kernel
    cannot hand out the same port twice.
    """
    sockets: list[socket.socket] = []

    def bind(port: int) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            return None
        sockets.append(s)
        return s

    try:
        pairs: list[int] = []
        for _ in range(100 * paired):
            if len(pairs) == paired:
                break
            first = bind(0)
            assert first is not None  # port 0 always binds
            port = first.getsockname()[1]
            if port + offset <= 65535 and bind(port + offset) is not None:
                pairs.append(port)
        if len(pairs) < paired:
            raise OSError(f"no free port pair (port, port + {offset}) on 127.0.0.1")
        singles = [bind(0) for _ in range(count - 2 * paired)]
        ports = [s.getsockname()[1] for s in singles if s is not None]
        return [*ports, *pairs, *(p + offset for p in pairs)]
    finally:
        for s in sockets:
            s.close()


# --------------------------------------------------------------------------------------------
# Logs and PID files


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def write_pid_file(path: Path, pid: int) -> None:
    """Record `pid` for humans and tools (`kill $(cat x.pid)`); atomic, so never half a number."""
    atomic_write_text(path, f"{pid}\n", fsync=False)  # lost on power loss with the process


def read_pid_file(path: Path) -> int | None:
    """The PID recorded in `path`, or None when there is no file or it holds no number."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Start and stop


def start_process(
    cmd: Sequence[str],
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    *,
    label: str = "",
    pid_file: Path | None = None,
) -> LoggedProcess:
    """Start `cmd` in a new session (its own process group), stdout + stderr appended to a log.

    `label` goes into the log's banner line (e.g. "attempt 2"); `pid_file`, when given, is
    written once the process exists and removed by `stop_process`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    banner = f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {label + ': ' if label else ''}"
    with open(log_path, "ab") as log:
        log.write(f"{banner}{' '.join(cmd)}\n".encode())
        log.flush()
        proc = LoggedProcess(
            cmd,
            log_path=log_path,
            pid_file=pid_file,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_process signals the group
        )
    if pid_file is not None:
        try:
            write_pid_file(pid_file, proc.pid)
        except BaseException:
            stop_process(proc)  # an unrecorded process would outlive every `stop`
            raise
    return proc


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def runs_command(pid: int, cmd: Sequence[str]) -> bool:
    """Whether `pid` still runs `cmd`, not a recycled PID; true where /proc is absent.

    Compares the subcommand words (`server start`, `mini -dir=...`): the program path alone
    would match any other `prefect` or `dask` on the machine.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid_alive(pid)
    return all(word.encode() in argv for word in cmd[1:3])


def _wait_gone(target: subprocess.Popen[bytes] | int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the process to end (reaping it when it is our child)."""
    if isinstance(target, subprocess.Popen):
        try:
            target.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout_s
    while pid_alive(target):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process(
    target: subprocess.Popen[bytes] | int,
    timeout_s: float = STOP_TIMEOUT_S,
    *,
    pid_file: Path | None = None,
) -> None:
    """Stop a process started by `start_process` (a Popen, or its PID) and its whole group.

    SIGTERM to the group, wait up to `timeout_s`, SIGKILL to the group and wait again; the
    group gets a last SIGKILL even after a clean exit, for children left behind. A PID (from a
    PID file or state.json) is for a process started by another invocation; the caller checks
    first that it still runs the same command (`runs_command`). The PID file is removed.
    """
    pid = target.pid if isinstance(target, subprocess.Popen) else target
    _signal_group(pid, signal.SIGTERM)
    if not _wait_gone(target, timeout_s):
        _signal_group(pid, signal.SIGKILL)
        _wait_gone(target, timeout_s)
    _signal_group(pid, signal.SIGKILL)  # the group id is the leader's PID (start_new_session)
    pid_file = pid_file or (target.pid_file if isinstance(target, LoggedProcess) else None)
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Waiting until ready


def wait_until(
    failure: str,
    check: Callable[[], bool],
    *,
    timeout_s: float,
    watch: Mapping[str, LoggedProcess],
    exit_hint: str = "",
) -> None:
    """Poll `check` until it returns True; fail fast if a watched process exits.

    `failure` says what did not happen ("prefect server did not answer http://..."), for the
    timeout message. An exception from `check` counts as "not ready yet" and the last one is
    quoted on timeout (a server refusing connections while it starts is normal). Raises
    `ProcessExited` (with `exit_hint` added) or `StartupError`, each with the log tails.
    """
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        try:
            if check():
                return
        except Exception as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        for name, proc in watch.items():
            code = proc.poll()
            if code is not None:
                log_tail = proc.log_tail()
                raise ProcessExited(
                    f"{name} exited with code {code} during startup{exit_hint}; "
                    f"last log lines ({proc.log_path}):\n{log_tail}",
                    code,
                    log_tail,
                )
        if time.monotonic() > deadline:
            error = f" (last error: {last_error})" if last_error else ""
            logs = "\n".join(
                f"--- {name} ({proc.log_path})\n{proc.log_tail(20)}" for name, proc in watch.items()
            )
            raise StartupError(
                f"{failure} within {timeout_s:.0f} s{error}; last log lines:\n{logs}"
            )
        time.sleep(POLL_INTERVAL_S)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """A 2xx answer from `url` (a health endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_answers(url: str, timeout_s: float = 2.0) -> bool:
    """Any HTTP answer at all (an S3 endpoint says 403 to an anonymous GET)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tcp_open(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts connections at `host:port` (or `tcp://host:port`)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def s3_buckets_ready(
    endpoint: str, access_key: str, secret_key: str, buckets: Iterable[str], region: str
) -> Callable[[], bool]:
    """A check: every bucket answers a signed HeadBucket (so credentials are enforced too)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            connect_timeout=1,
            read_timeout=2,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},  # SeaweedFS on host:port knows no virtual hosts
        ),
    )
    pending = list(buckets)

    def check() -> bool:
        while pending:  # buckets already seen stay done: each call asks only for the rest
            client.head_bucket(Bucket=pending[0])
            pending.pop(0)
        return True

    return check


def dask_workers_ready(address: str, count: int) -> Callable[[], bool]:
    """A check: at least `count` workers are registered with the scheduler at `address`."""

    def check() -> bool:
        from distributed import Client

        with Client(address, timeout=2) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"]) >= count

    return check


# --------------------------------------------------------------------------------------------
# Commands of the stack's components (one definition for the local stack and the fixtures)


def weed_mini_command(
    weed: str,
    data_dir: Path,
    buckets: Iterable[str],
    ports: Mapping[str, int],
    *extra: str,
) -> list[str]:
    """`weed mini` on 127.0.0.1 with every port explicit and the optional services off.

    `ports` maps each of `WEED_PORT_FLAGS` to a port: the defaults (8333, 9333, ...) would
    collide with a second stack or test run on the same machine.
    """
    return [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-bucket={','.join(buckets)}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *extra,
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]


def prefect_server_command(prefect: str, port: int) -> list[str]:
    """`prefect server start` on 127.0.0.1:`port` (UI and database come from the environment)."""
    return [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def dask_scheduler_command(dask: str, port: int, dashboard_port: int = 0) -> list[str]:
    """`dask scheduler` on 127.0.0.1:`port`; `dashboard_port` 0 = no dashboard."""
    dashboard = (
        ["--dashboard-address", f"127.0.0.1:{dashboard_port}"]
        if dashboard_port
        else ["--no-dashboard"]
    )
    return [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), *dashboard]


def dask_worker_command(
    dask: str,
    address: str,
    name: str,
    local_directory: Path,
    *,
    gpu: bool = False,
    death_timeout_s: int | None = None,
) -> list[str]:
    """One `dask worker` process with one thread (one batch at a time on its device).

    `gpu` adds the resource GPU=1 that restore tasks ask for; `death_timeout_s` makes the worker
    exit when the scheduler is gone that long (None = the Dask default, retry forever).
    """
    return [
        dask,
        "worker",
        address,
        "--name",
        name,
        "--host",
        "127.0.0.1",
        "--nthreads",
        "1",
        "--nworkers",
        "1",
        "--no-dashboard",
        "--local-directory",
        str(local_directory),
        *(["--death-timeout", str(death_timeout_s)] if death_timeout_s is not None else []),
        *(["--resources", "GPU=1"] if gpu else []),
    ]
