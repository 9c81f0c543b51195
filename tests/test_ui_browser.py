"""The operator's view, checked in a real browser: Prefect's UI rendered by headless Chromium.

A real Prefect server (API + UI on a free port, told its API URL), `pulse run` as an operator
starts it, one broken input among good ones; then Chromium loads the UI pages and the checks
read the rendered DOM: the run is listed with its tags and failure state, its page shows the
counts, its artifacts are there and the report shows the failure and the previews.

`PULSE_UI_SCREENSHOTS=docs/img pytest tests/test_ui_browser.py` refreshes the screenshots in
the docs (docs/operations.md and docs/pipeline.md show them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.prefect_server import PrefectServer, prefect_server_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=20000",
    "--window-size=1440,1000",  # lists render lazily: rows below the fold are not in the DOM
]
RENDER_TRIES = 4


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium not installed (`make test` installs Debian's `chromium`)")


def render(
    url: str,
    tmp: Path,
    screenshot: str | None = None,
    expect: tuple[str, ...] = (),
    height: int = 1000,
) -> str:
    """The DOM of `url` after the UI's scripts ran; optionally a screenshot named `screenshot`.

    The UI fetches its data after the page loads, and a busy machine can answer after Chromium
    stopped waiting: the page is loaded again (a few times) until every `expect` text is shown.
    """
    browser = chromium()
    profile = tmp / "chromium-profile"
    base = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    for _ in range(RENDER_TRIES):
        dom = subprocess.run(
            [*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True
        ).stdout
        if all(e in text_of(dom) for e in expect):
            break
    if screenshot:
        shots = Path(os.environ.get("PULSE_UI_SCREENSHOTS") or tmp)
        shots.mkdir(parents=True, exist_ok=True)
        target = shots / screenshot
        subprocess.run(
            [*base, f"--window-size=1440,{height}", f"--screenshot={target}", url],
            capture_output=True,
            timeout=180,
            check=True,
        )
        assert target.is_file() and Image.open(target).size == (1440, height)
    return dom


def text_of(dom: str) -> str:
    """The visible text of a DOM dump, whitespace collapsed (scripts and styles dropped)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def api(server: PrefectServer, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server.api_url}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@dataclass
class OperatorRun:
    server: PrefectServer
    ui: str  # http://127.0.0.1:<port>
    run: dict[str, Any]  # the restore-archive flow run, as the API returns it
    artifacts: dict[str, dict[str, Any]]  # key -> the newest artifact of the run
    dest: Path
    tmp: Path


@pytest.fixture(scope="module")
def operator_run(demo_generator, tmp_path_factory: pytest.TempPathFactory) -> OperatorRun:
    """`pulse run` on three good inputs and one broken one, against a server with its UI."""
    chromium()  # skip before starting anything when there is no browser
    tmp = tmp_path_factory.mktemp("ui")
    source, dest = tmp / "scans", tmp / "restored"
    source.mkdir()
    for name in ("astronaut-8.png", "grace-hopper-8.png", "grace-hopper-16.png"):
        shutil.copy(EXAMPLES / name, source / name)
    (source / "broken.png").write_bytes((EXAMPLES / "astronaut-8.png").read_bytes()[:60])
    with prefect_server_process(tmp / "prefect", ui=True) as server:
        argv = [sys.executable, "-m", "pulse_cli.main", "run", str(source), str(dest)]
        argv += ["--preset", "robust", "--steps", "60", "--samples", "2", "--max-failures", "1"]
        argv += ["--inputs-per-task", "2"]
        done = subprocess.run(
            argv, env=server.child_env(), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
        runs = api(server, "/flow_runs/filter", {"sort": "START_TIME_DESC"})
        parent = next(r for r in runs if r["name"].startswith("restore "))
        found = api(server, "/artifacts/filter", {"sort": "CREATED_DESC"})
        artifacts: dict[str, dict[str, Any]] = {}
        for item in found:
            if item["flow_run_id"] == parent["id"] and item["key"]:
                artifacts.setdefault(item["key"], item)
        yield OperatorRun(server, server.api_url.removesuffix("/api"), parent, artifacts, dest, tmp)


def test_the_api_has_the_run_with_its_counts_tags_and_artifacts(operator_run):
    run = operator_run.run
    assert run["state"]["name"] == "CompletedWithFailures"
    assert run["state"]["message"] == "3 ok, 1 failed, 0 skipped"
    assert {"pulse", "model:demo", "preset:robust", "failures"} <= set(run["tags"])
    kinds = {key.rsplit("-", 1)[-1] for key in operator_run.artifacts}
    assert kinds == {"progress", "results", "report"}


def test_the_runs_list_shows_the_run_its_failure_state_and_tags(operator_run):
    name = operator_run.run["name"]
    dom = render(f"{operator_run.ui}/runs", operator_run.tmp, "ui-runs.png", (name,))
    text = text_of(dom)
    assert operator_run.run["name"] in text
    assert "CompletedWithFailures" in text
    assert "failures" in text and "model:demo" in text


def test_the_run_page_shows_the_counts_and_the_named_sub_runs(operator_run):
    run_id = operator_run.run["id"]
    url = f"{operator_run.ui}/runs/flow-run/{run_id}"
    dom = render(url, operator_run.tmp, "ui-run.png", ("failed input broken.png",))
    text = text_of(dom)
    assert operator_run.run["name"] in text
    assert "CompletedWithFailures" in text
    assert "failed input broken.png" in text  # the parent run's log names the failed input
    tasks = api(operator_run.server, "/task_runs/filter", {})
    states = {t["name"]: t["state"]["name"] for t in tasks}
    assert states["batch 00000 (2): astronaut-8.png .. broken.png"] == "CompletedWithFailures"
    assert states["batch 00001 (2): grace-hopper-16.png .. grace-hopper-8.png"] == "Completed"
    subflows = api(operator_run.server, "/flow_runs/filter", {})
    assert any(
        r["name"].startswith("batches of ") and r["name"].endswith(": 4 inputs") for r in subflows
    )


def test_the_artifacts_page_lists_the_jobs_artifacts_and_its_history(operator_run):
    keys = tuple(operator_run.artifacts)
    text = text_of(
        render(f"{operator_run.ui}/artifacts", operator_run.tmp, "ui-artifacts.png", keys)
    )
    for key in keys:
        assert key in text
    report = next(k for k in keys if k.endswith("-report"))
    history = text_of(
        render(f"{operator_run.ui}/artifacts/key/{report}", operator_run.tmp, expect=(report,))
    )
    assert operator_run.run["name"] in history  # the job's history links each version to its run


def test_the_report_renders_failures_settings_and_previews(operator_run):
    report = next(a for k, a in operator_run.artifacts.items() if k.endswith("-report"))
    url = f"{operator_run.ui}/artifacts/artifact/{report['id']}"
    dom = render(url, operator_run.tmp, "ui-report.png", ("Settings as used",), height=2000)
    text = text_of(dom)
    assert "3 ok, 1 failed, 0 skipped" in text
    assert "Failures" in text and "broken.png" in text
    assert "Loss summary" in text and "Settings as used" in text
    assert "Batches" in text and "Per input" in text
    # local run: the contact sheets are inline images, and the browser decoded them
    images = re.findall(r'<img[^>]+src="(data:image/jpeg;base64,[^"]+)"', dom)
    assert len(images) == 3
    # every search option appears with its value as used, never None for "the preset's"
    assert (
        "| steps | `60` |" in report["data"]
        and "| intermediate_radius | `0.05` |" in report["data"]
    )


def test_the_results_table_puts_the_failure_first(operator_run):
    results = next(a for k, a in operator_run.artifacts.items() if k.endswith("-results"))
    rows = json.loads(results["data"])
    assert rows[0]["input"] == "broken.png" and rows[0]["status"] == "failed"
    assert all(r["status"] == "ok" and r["attempts"] >= 2 for r in rows[1:])
    url = f"{operator_run.ui}/artifacts/artifact/{results['id']}"
    dom = render(url, operator_run.tmp, expect=("best step",))
    text = text_of(dom)
    assert "broken.png" in text and "best step" in text
