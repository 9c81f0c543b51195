"""`pulse run` without a Prefect server: the temporary API must survive a slow start.

Measured before the fix: under load on a 2-core box the temporary API took over Prefect's 20 s
limit and runs failed with "Timed out while attempting to connect to ephemeral Prefect API
server". These tests run the real command in a subprocess with a fresh PREFECT_HOME.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pulse_cli.run import EPHEMERAL_STARTUP_TIMEOUT, TIMEOUT_VARIABLE, prepare_prefect_environment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"


def test_the_cli_raises_the_start_up_limit_unless_the_user_set_one(monkeypatch):
    monkeypatch.delenv(TIMEOUT_VARIABLE, raising=False)
    prepare_prefect_environment()
    assert os.environ[TIMEOUT_VARIABLE] == str(EPHEMERAL_STARTUP_TIMEOUT)
    monkeypatch.setenv(TIMEOUT_VARIABLE, "42")
    prepare_prefect_environment()
    assert os.environ[TIMEOUT_VARIABLE] == "42"


def _pulse_run(tmp_path: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "source"
    source.mkdir(exist_ok=True)
    (source / "a.png").write_bytes((EXAMPLES / "astronaut-8.png").read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # fresh: the slowest (first) start
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **extra_env,
    )
    argv = [sys.executable, "-m", "pulse_cli.main", "run", str(source), str(tmp_path / "dest")]
    argv += ["--steps", "3", "--samples", "1", "--preset", "reference"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_pulse_run_completes_with_every_core_busy(demo_generator, tmp_path):
    """A busy process per core for the whole run: the temporary API still comes up."""
    burners = [
        multiprocessing.get_context("spawn").Process(target=_burn, args=(300.0,), daemon=True)
        for _ in range(os.cpu_count() or 2)
    ]
    for p in burners:
        p.start()
    try:
        result = _pulse_run(tmp_path, {})
    finally:
        for p in burners:
            p.kill()
            p.join(timeout=10)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 restored, 0 failed" in result.stdout


def test_a_start_up_timeout_says_how_to_use_a_real_server(demo_generator, tmp_path):
    result = _pulse_run(tmp_path, {TIMEOUT_VARIABLE: "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the temporary Prefect API did not start" in result.stderr
    assert "PREFECT_API_URL=" in result.stderr and TIMEOUT_VARIABLE in result.stderr
