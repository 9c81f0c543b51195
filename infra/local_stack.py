"""Start, inspect and stop the local stack: the whole running system as plain processes.

    python infra/local_stack.py start [--gpu-workers N] [--cpu-workers M] [--state-dir DIR]
    eval "$(python infra/local_stack.py env)"      # PREFECT_API_URL, AWS_*, PULSE_DASK_ADDRESS
    python infra/local_stack.py status
    python infra/local_stack.py stop

Components (each a background process in its own process group, log and PID file in the state
directory, `.stack/` by default):
- prefect-server   `prefect server start` (API + UI, SQLite in the state directory)
- s3               SeaweedFS `weed mini`, an S3-compatible store; buckets created at start
- dask-scheduler   `dask scheduler`
- gpu-<i>          `dask worker --resources GPU=1 --nthreads 1`, CUDA_VISIBLE_DEVICES=<i>
- cpu-<i>          `dask worker --nthreads 1` (no GPU resource)
- prefect-worker   `prefect worker start --pool pulse-process` for the deployments in prefect.yaml

On a machine without a GPU a "gpu" worker simply runs on the CPU: it only carries the resource
tag that the restore tasks ask for. Everything listens on 127.0.0.1. `stop` kills by PID (the
process group of each component, after checking the PID still runs the command we started).
See infra/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".stack"
DEFAULT_BUCKETS = "pulse-source,pulse-dest"
WORK_POOL = "pulse-process"
REGION = "us-east-1"
STOP_TIMEOUT_S = 15.0

# `weed mini` ports besides S3, all internal; the admin gRPC port must be admin port + 10000
# (its maintenance worker dials that whatever the flag says), so those two are chosen together.
WEED_INTERNAL_PORTS = (
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
)


class StackError(RuntimeError):
    """The stack could not be started, reached or stopped; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Small helpers


def executable(name: str) -> str:
    """A console script next to this interpreter (a venv's bin/) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` not found: install the project with `make install`")
    return found


def free_port(port: int = 0) -> int:
    """`port` if given (non-zero), else a port free on 127.0.0.1 right now."""
    if port:
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_admin_pair() -> int:
    """A free port p with p + 10000 free too (SeaweedFS admin HTTP + gRPC)."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + 10000 > 65535:
                continue
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise StackError("no free port pair for the SeaweedFS admin server")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def runs_command(pid: int, cmd: list[str]) -> bool:
    """Whether `pid` still runs `cmd` (not a recycled PID); true where /proc is absent."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid_alive(pid)
    wanted = [c.encode() for c in cmd[1:3]]  # subcommand words: `server start`, `mini -dir=..`
    return all(w in argv for w in wanted)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_answers(url: str) -> bool:
    """Any HTTP answer at all (an S3 endpoint says 403 to an anonymous GET)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tcp_open(address: str) -> bool:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def wait_until(what: str, check: Any, timeout_s: float, state: dict[str, Any]) -> None:
    """Poll `check` until true; fail at once if a started component exited (port taken...)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        for name, c in state["components"].items():
            if not pid_alive(c["pid"]):
                raise StackError(
                    f"{name} exited during startup (a port in use? see --help for the port "
                    f"options); last log lines ({c['log']}):\n{tail(Path(c['log']))}"
                )
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {n}\n{tail(Path(c['log']), 10)}" for n, c in state["components"].items()
            )
            raise StackError(f"{what} not ready within {timeout_s:.0f} s; last log lines:\n{logs}")
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# The stack's state on disk


class Stack:
    """Where a stack keeps its logs, PID files and state.json; starts and stops components."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir.resolve()
        self.logs = self.dir / "logs"
        self.pids = self.dir / "pids"
        self.state_file = self.dir / "state.json"

    def load(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {"components": {}, "urls": {}, "env": {}}

    def save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.chmod(0o600)  # holds the local S3 credentials
        tmp.replace(self.state_file)

    def running(self, state: dict[str, Any]) -> dict[str, int]:
        return {
            name: c["pid"]
            for name, c in state["components"].items()
            if pid_alive(c["pid"]) and runs_command(c["pid"], c["cmd"])
        }

    def spawn(
        self, state: dict[str, Any], name: str, cmd: list[str], env: dict[str, str], cwd: Path
    ) -> Path:
        """Start one component in its own session; record it at once (stop finds it)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop kills the group
            )
        (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
        state["components"][name] = {"pid": proc.pid, "cmd": cmd, "log": str(log)}
        self.save(state)
        return log

    def stop(self, state: dict[str, Any], timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
        """Stop every recorded component, last started first; return what was stopped."""
        stopped = []
        for name, c in reversed(list(state["components"].items())):
            pid = c["pid"]
            if pid_alive(pid) and runs_command(pid, c["cmd"]):
                stop_group(pid, timeout_s)
                stopped.append(f"{name} (pid {pid})")
            with contextlib.suppress(FileNotFoundError):
                (self.pids / f"{name}.pid").unlink()
        state["components"] = {}
        self.save(state)
        return stopped


def stop_group(pid: int, timeout_s: float) -> None:
    """SIGTERM the process group led by `pid`, wait, then SIGKILL the group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# Commands


def s3_credentials(state: dict[str, Any]) -> tuple[str, str]:
    """The environment's AWS keys if set, else the stack's own (generated once, kept in state)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    saved = state.get("env", {})
    if saved.get("AWS_ACCESS_KEY_ID") and saved.get("AWS_SECRET_ACCESS_KEY"):
        return saved["AWS_ACCESS_KEY_ID"], saved["AWS_SECRET_ACCESS_KEY"]
    return f"pulse-local-{secrets.token_hex(4)}", secrets.token_hex(20)


def buckets_ready(endpoint: str, key: str, secret: str, buckets: list[str]) -> Any:
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )

    def check() -> bool:
        try:
            for bucket in buckets:
                client.head_bucket(Bucket=bucket)
        except Exception:
            return False
        return True

    return check


def dask_workers_ready(address: str, count: int) -> Any:
    def check() -> bool:
        from distributed import Client

        try:
            with Client(address, timeout=2) as client:
                return len(client.scheduler_info(n_workers=-1)["workers"]) >= count
        except OSError:
            return False

    return check


def prefect_worker_ready(api_url: str, pool: str) -> Any:
    def check() -> bool:
        request = urllib.request.Request(
            f"{api_url}/work_pools/{pool}/workers/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return bool(json.loads(response.read()))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    return check


def start(args: argparse.Namespace) -> int:
    stack = Stack(args.state_dir)
    state = stack.load()
    if running := stack.running(state):
        raise StackError(
            f"the stack in {stack.dir} is already running ({', '.join(running)}): "
            f"run `python infra/local_stack.py stop --state-dir {stack.dir}` first"
        )
    state["components"] = {}
    buckets = [b for b in args.buckets.split(",") if b]
    key, secret = s3_credentials(state)
    prefect_port, s3_port, dask_port = (
        free_port(args.prefect_port),
        free_port(args.s3_port),
        free_port(args.dask_port),
    )
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    endpoint = f"http://127.0.0.1:{s3_port}"
    address = f"tcp://127.0.0.1:{dask_port}"
    prefect_home = stack.dir / "prefect"
    client_env = {
        "PREFECT_API_URL": api_url,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "PULSE_DASK_ADDRESS": address,
    }
    state["env"] = client_env
    state["urls"] = {
        "prefect_api": api_url,
        "prefect_ui": api_url.removesuffix("/api") if not args.no_ui else "(UI off)",
        "s3": endpoint,
        "dask_scheduler": address,
        "dask_dashboard": f"http://127.0.0.1:{args.dashboard_port}/status"
        if args.dashboard_port
        else "(off)",
    }
    state["buckets"] = buckets
    stack.save(state)

    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    worker_env = {
        **base,
        **client_env,
        "PREFECT_HOME": str(prefect_home),
        "PYTHONPATH": pythonpath,
        "PULSE_PIPELINE_ROOT": str(REPO_ROOT),
    }
    timeout = args.timeout
    try:
        # Prefect server: API (+ UI), SQLite under the state dir.
        stack.spawn(
            state,
            "prefect-server",
            [
                executable("prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
            ],
            {
                **base,
                "PREFECT_HOME": str(prefect_home),
                "PREFECT_UI_ENABLED": "false" if args.no_ui else "true",
            },
            stack.dir,
        )
        # SeaweedFS: credentials are enforced because the AWS keys are set when it starts.
        s3_dir = stack.dir / "s3"
        s3_dir.mkdir(parents=True, exist_ok=True)
        admin = free_admin_pair()
        weed_ports = {flag: free_port() for flag in WEED_INTERNAL_PORTS}
        weed_ports.update(
            {"s3.port": s3_port, "admin.port": admin, "admin.port.grpc": admin + 10000}
        )
        stack.spawn(
            state,
            "s3",
            [
                executable("weed"),
                "mini",
                f"-dir={s3_dir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                f"-bucket={','.join(buckets)}",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                *(f"-{flag}={port}" for flag, port in weed_ports.items()),
            ],
            {**base, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
            s3_dir,
        )
        # Dask scheduler, then workers (they retry the scheduler until it answers).
        dask = executable("dask")
        stack.spawn(
            state,
            "dask-scheduler",
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(dask_port),
                *(
                    ["--dashboard-address", f"127.0.0.1:{args.dashboard_port}"]
                    if args.dashboard_port
                    else ["--no-dashboard"]
                ),
            ],
            base,
            stack.dir,
        )
        workers = [(f"gpu-{i}", True, i) for i in range(args.gpu_workers)]
        workers += [(f"cpu-{i}", False, None) for i in range(args.cpu_workers)]
        for name, gpu, index in workers:
            env = dict(worker_env)
            if gpu:
                env["CUDA_VISIBLE_DEVICES"] = str(index)  # one GPU per worker process
            else:
                env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker never takes a GPU
            stack.spawn(
                state,
                name,
                [
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
                    str(stack.dir / "dask" / name),
                    *(["--resources", "GPU=1"] if gpu else []),
                ],
                env,
                stack.dir,
            )
        if args.prefect_worker:
            stack.spawn(
                state,
                "prefect-worker",
                [
                    executable("prefect"),
                    "worker",
                    "start",
                    "--pool",
                    WORK_POOL,
                    "--type",
                    "process",
                    "--name",
                    f"local-{socket.gethostname()}",
                ],
                worker_env,
                REPO_ROOT,
            )

        wait_until("Prefect server", lambda: http_ok(f"{api_url}/health"), timeout, state)
        wait_until("S3 buckets", buckets_ready(endpoint, key, secret, buckets), timeout, state)
        wait_until(
            f"Dask cluster ({len(workers)} workers)",
            dask_workers_ready(address, len(workers)),
            timeout,
            state,
        )
        if args.prefect_worker:
            wait_until("Prefect worker", prefect_worker_ready(api_url, WORK_POOL), timeout, state)
    except BaseException:
        stack.stop(state)
        raise

    print(f"local stack running (state, logs and PID files in {stack.dir}):")
    for name, url in state["urls"].items():
        print(f"  {name:15s} {url}")
    print(f"  {'buckets':15s} {', '.join(buckets)}")
    print(f"  {'dask workers':15s} {', '.join(w[0] for w in workers) or '(none)'}")
    print("\nPoint clients at it:")
    print(f'  eval "$(python infra/local_stack.py env --state-dir {stack.dir})"')
    return 0


def env(args: argparse.Namespace) -> int:
    state = Stack(args.state_dir).load()
    if not state.get("env"):
        raise StackError("no stack state found: run `python infra/local_stack.py start` first")
    for name, value in state["env"].items():
        print(f"export {name}={value}")
    return 0


def status(args: argparse.Namespace) -> int:
    stack = Stack(args.state_dir)
    state = stack.load()
    if not state["components"]:
        print(f"no stack running (state dir {stack.dir})")
        return 1
    running = stack.running(state)
    for name, c in state["components"].items():
        mark = "up  " if name in running else "DOWN"
        print(f"  {mark} {name:15s} pid {c['pid']:<8d} log {c['log']}")
    urls = state["urls"]
    probes = {
        "prefect_api": http_ok(f"{urls['prefect_api']}/health"),
        "s3": http_answers(urls["s3"]),
        "dask_scheduler": tcp_open(urls["dask_scheduler"]),
    }
    for name, ok in probes.items():
        print(f"  {'up  ' if ok else 'DOWN'} {name:15s} {urls[name]}")
    healthy = len(running) == len(state["components"]) and all(probes.values())
    return 0 if healthy else 1


def stop(args: argparse.Namespace) -> int:
    stack = Stack(args.state_dir)
    stopped = stack.stop(stack.load())
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status", "env"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="logs, PID files, data and state.json (default: .stack/ in the repository)",
    )
    start_opts = parser.add_argument_group("start")
    start_opts.add_argument("--gpu-workers", type=int, default=1, help="Dask workers with GPU=1")
    start_opts.add_argument("--cpu-workers", type=int, default=0, help="Dask workers, no GPU")
    start_opts.add_argument("--prefect-port", type=int, default=4200, help="0 = any free port")
    start_opts.add_argument("--s3-port", type=int, default=8333, help="0 = any free port")
    start_opts.add_argument("--dask-port", type=int, default=8786, help="0 = any free port")
    start_opts.add_argument(
        "--dashboard-port", type=int, default=8787, help="Dask dashboard (needs bokeh); 0 = off"
    )
    start_opts.add_argument("--buckets", default=DEFAULT_BUCKETS, help="comma-separated")
    start_opts.add_argument("--no-ui", action="store_true", help="Prefect API only (starts faster)")
    start_opts.add_argument(
        "--no-prefect-worker",
        dest="prefect_worker",
        action="store_false",
        help=f"do not start a process worker on the {WORK_POOL!r} pool",
    )
    start_opts.add_argument("--timeout", type=float, default=120.0, help="seconds per component")
    args = parser.parse_args(argv)
    commands = {"start": start, "stop": stop, "status": status, "env": env}
    try:
        return commands[args.command](args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
