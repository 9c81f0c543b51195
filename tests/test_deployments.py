"""prefect.yaml against a real Prefect server: deploy both deployments, run one with a worker.

Everything goes through the `prefect` CLI, as an operator would (work pool, variables,
`prefect --no-prompt deploy --all`, `prefect deployment run`, `prefect worker start`); the
Prefect client in this process only reads what the server recorded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.prefect_server import PrefectServer, find_executable, start_process, stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_LR = REPO_ROOT / "examples" / "lr"
POOL = "pulse-process"
NIGHTLY = "restore-archive/nightly-restore"
ADHOC = "restore-archive/restore-adhoc"
CLI_TIMEOUT_S = 180  # `prefect deploy` imports the flow (torch): ~6 s here
RUN_TIMEOUT_S = 300  # worker start + flow run subprocess + 2 tiny images: ~30 s here


def prefect_cli(env: dict[str, str], *args: str) -> str:
    """Run `prefect <args>` in the repository root; return stdout, fail with both streams."""
    prefect = find_executable("prefect")
    assert prefect, "`prefect` not found"
    proc = subprocess.run(
        [prefect, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"prefect {' '.join(args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def deployed(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Work pool, variables and `prefect --no-prompt deploy --all`, as the README says."""
    from prefect import get_client

    nightly = tmp_path_factory.mktemp("nightly")
    env = prefect_server.child_env()
    prefect_cli(env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    prefect_cli(
        env, "variable", "set", "pulse_nightly_source", str(nightly / "source"), "--overwrite"
    )
    prefect_cli(env, "variable", "set", "pulse_nightly_dest", str(nightly / "dest"), "--overwrite")
    prefect_cli(env, "--no-prompt", "deploy", "--all")

    with prefect_server.settings(), get_client(sync_client=True) as client:
        deployments = {name: client.read_deployment_by_name(name) for name in (NIGHTLY, ADHOC)}
        # Never let the 02:00 UTC schedule fire into this test's worker.
        client.pause_deployment(deployments[NIGHTLY].id)
    yield {"deployments": deployments, "nightly": nightly}


def test_deploy_all_creates_the_nightly_deployment_with_its_cron_schedule(deployed):
    nightly = deployed["deployments"][NIGHTLY]
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "UTC"
    assert nightly.global_concurrency_limit is not None
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.work_pool_name == POOL
    # Prefect variables were filled in at deploy time.
    assert nightly.parameters["source"] == str(deployed["nightly"] / "source")
    assert nightly.parameters["dest"] == str(deployed["nightly"] / "dest")
    assert nightly.parameters["options"]["task_runner"] == "dask"
    assert nightly.parameters["settings"]["preset"] == "robust"


def test_the_deployment_run_form_describes_settings_with_dropdowns(deployed):
    """What the UI's run form renders: descriptions on every field, choices as enums."""
    schema = deployed["deployments"][ADHOC].parameter_openapi_schema
    definitions = schema["definitions"]
    assert schema["properties"]["settings"]["$ref"].endswith("/RestoreSettings")
    settings = definitions["RestoreSettings"]["properties"]
    assert set(settings["preset"]["enum"]) == {"robust", "fast", "reference"}
    assert "center-crop" in settings["fit"]["enum"] and "cuda" in settings["device"]["enum"]
    assert definitions["PipelineOptions"]["properties"]["task_runner"]["enum"] == [
        "threads",
        "dask",
    ]
    search = definitions["SearchConfig"]["properties"]
    assert "bicubic" in search["operator"]["enum"]
    assert all(p.get("description") for d in definitions.values() for p in d["properties"].values())


def test_deploy_all_creates_the_adhoc_deployment_without_schedule_or_defaults(deployed):
    adhoc = deployed["deployments"][ADHOC]
    assert adhoc.schedules == []
    assert adhoc.work_pool_name == POOL
    assert {"source", "dest"} <= set(adhoc.parameter_openapi_schema["required"])
    assert "source" not in adhoc.parameters
    # Workers find the code through the environment, not a path of the deploying machine.
    (step,) = adhoc.pull_steps
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "{{ $PULSE_PIPELINE_ROOT }}"


def test_a_process_worker_runs_the_adhoc_deployment_to_completion(
    deployed, prefect_server: PrefectServer, tmp_path: Path
):
    from prefect import get_client

    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    for name in ("astronaut-8.png", "grace-hopper-8.png"):
        shutil.copy(EXAMPLES_LR / name, source / name)
    env = prefect_server.child_env(PREFECT_WORKER_QUERY_SECONDS="1")
    out = prefect_cli(
        env,
        "deployment",
        "run",
        ADHOC,
        "--param",
        f"source={source}",
        "--param",
        f"dest={dest}",
        "--param",
        'settings={"samples": 1, "preset": "reference", "search": {"steps": 3}}',
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    flow_run_id = match.group(1)

    worker_log = tmp_path / "worker.log"
    worker = start_process(
        [find_executable("prefect") or "prefect", "worker", "start", "--pool", POOL],
        worker_log,
        {**env, "PULSE_PIPELINE_ROOT": str(REPO_ROOT)},
        cwd=tmp_path,  # not the repository: the pull step must take the worker there
    )
    try:
        with prefect_server.settings(), get_client(sync_client=True) as client:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            state = client.read_flow_run(flow_run_id).state
            while not (state and state.is_final()):
                assert worker.poll() is None, f"worker exited:\n{worker_log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, (
                    f"flow run still {state and state.name} after {RUN_TIMEOUT_S} s; "
                    f"worker log:\n{worker_log.read_text()[-3000:]}"
                )
                time.sleep(1)
                state = client.read_flow_run(flow_run_id).state
    finally:
        stop_process(worker)

    assert state.is_completed(), f"{state.name}: {state.message}\n{worker_log.read_text()[-3000:]}"
    assert {p.parent.name for p in dest.glob("*/sample-*.png")} == {"astronaut-8", "grace-hopper-8"}
