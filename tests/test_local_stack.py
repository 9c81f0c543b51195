"""infra/local_stack.py starts the whole system as processes, answers, and stops by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import local_stack, processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "infra" / "local_stack.py"
COMMAND_TIMEOUT_S = 240  # start waits up to --timeout per component; ~12 s here


def stack_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--state-dir", str(state_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):  # an exited, not yet reaped process is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    """A started stack on free ports (1 GPU-resource worker, 1 CPU worker, Prefect worker)."""
    state_dir = tmp_path / "stack"
    started = stack_cli(
        state_dir,
        "start",
        "--gpu-workers=1",
        "--cpu-workers=1",
        "--prefect-port=0",
        "--s3-port=0",
        "--dask-port=0",
        "--dashboard-port=0",
        "--no-ui",
        "--timeout=90",
    )
    state_file = state_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"components": {}}
    try:
        assert started.returncode == 0, f"{started.stdout}\n{started.stderr}"
        yield state_dir, state
    finally:
        stack_cli(state_dir, "stop")
        for component in state["components"].values():  # last resort, by recorded PID
            if not _pid_gone(component["pid"]):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(component["pid"], signal.SIGKILL)


def test_started_stack_serves_prefect_s3_and_dask_then_stops_by_pid(stack):
    import boto3
    from distributed import Client

    state_dir, state = stack
    env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in stack_cli(state_dir, "env").stdout.splitlines()
    )
    pids = {name: c["pid"] for name, c in state["components"].items()}
    assert set(pids) == {
        "prefect-server",
        "s3",
        "dask-scheduler",
        "gpu-0",
        "cpu-0",
        "prefect-worker",
    }

    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=5) as response:
        assert response.status == 200
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    assert {"pulse-source", "pulse-dest"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
    with Client(env["PULSE_DASK_ADDRESS"], timeout=10) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert {w["name"]: w["resources"] for w in workers} == {"gpu-0": {"GPU": 1}, "cpu-0": {}}
    assert stack_cli(state_dir, "status").returncode == 0

    stopped = stack_cli(state_dir, "stop")

    assert stopped.returncode == 0, stopped.stderr
    assert all(_pid_gone(pid) for pid in pids.values()), stopped.stdout
    assert not list((state_dir / "pids").glob("*.pid"))
    assert stack_cli(state_dir, "status").returncode == 1


def test_stack_prefect_server_ui_reaches_its_api_on_a_port_other_than_4200(tmp_path: Path):
    """The UI learns its API address from `/ui-settings`; Prefect derives it from its own
    settings, not from `--port`, so the stack must say it (else "Can't connect to :4200")."""
    port = next(p for p in processes.free_ports(2) if p != 4200)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env = local_stack.prefect_server_env(base, tmp_path / "prefect", port, ui=True)
    server = processes.start_process(
        processes.prefect_server_command(local_stack.executable("prefect"), port),
        tmp_path / "prefect-server.log",
        env,
        tmp_path,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        processes.wait_until(
            f"Prefect server did not answer {base_url}/api/health",
            lambda: processes.http_ok(f"{base_url}/api/health"),
            timeout_s=120,
            watch={"prefect-server": server},
        )
        with urllib.request.urlopen(f"{base_url}/ui-settings", timeout=10) as response:
            ui_settings = json.loads(response.read())
    finally:
        processes.stop_process(server)

    assert ui_settings["api_url"] == f"{base_url}/api"
