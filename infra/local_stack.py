"""Start, inspect and stop the local stack: the whole running system as plain processes.

    python infra/local_stack.py start [--gpu-workers N] [--cpu-workers M] [--state-dir DIR]
    eval "$(python infra/local_stack.py env)"      # PREFECT_API_URL, AWS_*, PULSE_DASK_ADDRESS
    python infra/local_stack.py status
    python infra/local_stack.py stop

Components (each a background process in its own process group, log and PID file in the state
directory, `.stack/` by default):
- prefect-server   `prefect server start` (API + UI, SQLite in the state directory; the UI is
                   told its API URL, so any --prefect-port works)
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
import json
import os
import secrets
import socket
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pulse_core.atomic import atomic_write_text

try:  # imported as `infra.local_stack` (the repository root on sys.path)
    from infra import processes
except ModuleNotFoundError:  # run as `python infra/local_stack.py`: infra/ is sys.path[0]
    import processes  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".stack"
DEFAULT_BUCKETS = "pulse-source,pulse-dest"
WORK_POOL = "pulse-process"
REGION = "us-east-1"
DEFAULT_PORTS = {"prefect": 4200, "s3": 8333, "dask": 8786}  # each tool's usual port; 0 = any free
STOP_TIMEOUT_S = 15.0


class StackError(RuntimeError):
    """The stack could not be started, reached or stopped; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Small helpers (starting, waiting and stopping processes: infra/processes.py)


def executable(name: str) -> str:
    """A console script next to this interpreter (a venv's bin/) first, then on PATH."""
    found = processes.find_executable(name)
    if found is None:
        raise StackError(f"`{name}` not found: install the project with `make install`")
    return found


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
        # 0o600 from the temp file on: it holds the local S3 credentials.
        atomic_write_text(self.state_file, json.dumps(state, indent=2), mode=0o600)

    def running(self, state: dict[str, Any]) -> dict[str, int]:
        return {
            name: c["pid"]
            for name, c in state["components"].items()
            if processes.pid_alive(c["pid"]) and processes.runs_command(c["pid"], c["cmd"])
        }

    def spawn(
        self, state: dict[str, Any], name: str, cmd: list[str], env: dict[str, str], cwd: Path
    ) -> processes.LoggedProcess:
        """Start one component in its own session; record it at once (stop finds it)."""
        proc = processes.start_process(
            cmd, self.logs / f"{name}.log", env, cwd, pid_file=self.pids / f"{name}.pid"
        )
        state["components"][name] = {"pid": proc.pid, "cmd": cmd, "log": str(proc.log_path)}
        self.save(state)
        return proc

    def stop(self, state: dict[str, Any], timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
        """Stop every recorded component, last started first; return what was stopped.

        By PID from state.json (another invocation started them), only while that PID still
        runs the recorded command: a recycled PID belongs to someone else.
        """
        stopped = []
        for name, c in reversed(list(state["components"].items())):
            pid, pid_file = c["pid"], self.pids / f"{name}.pid"
            if processes.pid_alive(pid) and processes.runs_command(pid, c["cmd"]):
                processes.stop_process(pid, timeout_s, pid_file=pid_file)
                stopped.append(f"{name} (pid {pid})")
            pid_file.unlink(missing_ok=True)
        state["components"] = {}
        self.save(state)
        return stopped


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


def prefect_server_env(
    base: dict[str, str], prefect_home: Path, port: int, *, ui: bool
) -> dict[str, str]:
    """The environment of the stack's `prefect server start` on 127.0.0.1:`port`.

    Why PREFECT_UI_API_URL: the UI asks the server for its API address (`/ui-settings`), and
    Prefect builds that from its own host/port settings, not from `--port`. On any port but
    4200 the UI would load and then fail to reach "http://127.0.0.1:4200/api". PREFECT_API_URL
    is the same address, for anything the server process itself runs as a client.
    """
    api_url = f"http://127.0.0.1:{port}/api"
    return {
        **base,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_UI_ENABLED": "true" if ui else "false",
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_API_URL": api_url,
    }


def prefect_worker_ready(api_url: str, pool: str) -> Callable[[], bool]:
    """A check: the server lists a worker polling `pool` (errors count as "not yet")."""
    request = urllib.request.Request(
        f"{api_url}/work_pools/{pool}/workers/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )

    def check() -> bool:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(json.loads(response.read()))

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
    # 0 = any free port; all three chosen at once, so never the same one twice.
    chosen = iter(processes.free_ports(3))
    prefect_port, s3_port, dask_port = (
        port or next(chosen) for port in (args.prefect_port, args.s3_port, args.dask_port)
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
    workers = [(f"gpu-{i}", True, i) for i in range(args.gpu_workers)]
    workers += [(f"cpu-{i}", False, None) for i in range(args.cpu_workers)]
    procs: dict[str, processes.LoggedProcess] = {}  # watched while the stack comes up

    def wait_until(failure: str, check: Callable[[], bool]) -> None:
        processes.wait_until(
            failure,
            check,
            timeout_s=args.timeout,
            watch=procs,
            exit_hint=" (a port in use? see --help for the port options)",
        )

    try:
        # Prefect server: API (+ UI), SQLite under the state dir.
        procs["prefect-server"] = stack.spawn(
            state,
            "prefect-server",
            processes.prefect_server_command(executable("prefect"), prefect_port),
            prefect_server_env(base, prefect_home, prefect_port, ui=not args.no_ui),
            stack.dir,
        )
        # SeaweedFS: credentials are enforced because the AWS keys are set when it starts.
        s3_dir = stack.dir / "s3"
        s3_dir.mkdir(parents=True, exist_ok=True)
        flags = processes.WEED_PORT_FLAGS
        weed_ports = dict(zip(flags, processes.free_ports(len(flags), paired=1), strict=True))
        weed_ports["s3.port"] = s3_port
        procs["s3"] = stack.spawn(
            state,
            "s3",
            processes.weed_mini_command(executable("weed"), s3_dir, buckets, weed_ports),
            {**base, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
            s3_dir,
        )
        # Dask scheduler, then workers (they retry the scheduler until it answers).
        dask = executable("dask")
        procs["dask-scheduler"] = stack.spawn(
            state,
            "dask-scheduler",
            processes.dask_scheduler_command(dask, dask_port, args.dashboard_port),
            base,
            stack.dir,
        )
        for name, gpu, index in workers:
            # One GPU per worker process; a CPU worker never takes one.
            env = {**worker_env, "CUDA_VISIBLE_DEVICES": str(index) if gpu else ""}
            procs[name] = stack.spawn(
                state,
                name,
                processes.dask_worker_command(
                    dask, address, name, stack.dir / "dask" / name, gpu=gpu
                ),
                env,
                stack.dir,
            )
        if args.prefect_worker:
            procs["prefect-worker"] = stack.spawn(
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

        health = f"{api_url}/health"
        wait_until(f"Prefect server did not answer {health}", lambda: processes.http_ok(health))
        wait_until(
            f"S3 at {endpoint} did not serve buckets {buckets}",
            processes.s3_buckets_ready(endpoint, key, secret, buckets, REGION),
        )
        wait_until(
            f"Dask cluster at {address} did not register its {len(workers)} workers",
            processes.dask_workers_ready(address, len(workers)),
        )
        if args.prefect_worker:
            wait_until(
                f"Prefect worker did not register with pool {WORK_POOL!r}",
                prefect_worker_ready(api_url, WORK_POOL),
            )
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
        "prefect_api": processes.http_ok(f"{urls['prefect_api']}/health"),
        "s3": processes.http_answers(urls["s3"]),
        "dask_scheduler": processes.tcp_open(urls["dask_scheduler"]),
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
    for component, port in DEFAULT_PORTS.items():
        start_opts.add_argument(
            f"--{component}-port", type=int, default=port, help="0 = any free port"
        )
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
    except (StackError, processes.StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
