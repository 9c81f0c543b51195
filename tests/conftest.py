"""Shared test fixtures.

Server fixtures (SeaweedFS, Prefect, Dask) start real processes on 127.0.0.1 and stop them by PID.
Reference data lives in ../shared (beside the checkout); tests that need it skip cleanly without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Real servers for integration tests: the session-scoped `seaweedfs` fixture (S3, credentials on).
pytest_plugins = ["tests.s3_server", "tests.prefect_server", "tests.dask_cluster"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "stylegan1-reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The StyleGAN v1 reference fixtures produced by the authors' code."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {SHARED_FIXTURES} (../shared is absent)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def demo_generator():
    """The real demo generator from the model cache (`make test` pulls it before pytest runs).

    Tests never download: if the cache lacks it, they skip and say how to fetch it.
    """
    from pulse_core.errors import ModelFileError
    from pulse_core.generators.loading import load_generator

    try:
        return load_generator("demo")
    except ModelFileError as exc:
        pytest.skip(f"demo model not cached ({exc}); run `make model` or `pulse models pull demo`")


@pytest.fixture(scope="module")
def moto_endpoint():
    """A moto S3 endpoint shared by one test module (fast unit tests; see tests.helpers)."""
    from tests.helpers import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def temporary_prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """A temporary Prefect API (SQLite in a temp dir) for the flow calls of one test module."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with (
            temporary_settings(updates={PREFECT_HOME: home}),
            prefect_test_harness(server_startup_timeout=90),
        ):
            yield


@pytest.fixture(scope="module")
def prefect_harness(demo_generator, temporary_prefect_api) -> None:
    """The temporary Prefect API, for modules whose flows restore with the demo generator.

    Requires the demo generator in the model cache, so those modules skip cleanly without it.
    """
