"""A run's lease in dest: how the next run tells a live run from a crashed one.

A run writes `dest/_runs/<run id>/lease.json` when it starts and refreshes it every
`HEARTBEAT_S` seconds from a background thread; it records `finished` (with the outcome) when it
ends, even when it fails. A lease that is not finished and whose heartbeat is older than
`stale_after` belongs to a run that died without cleaning up (SIGKILL, power loss, an OOM kill
of the whole pod): the next run adopts its leftovers and, where it can reach the Prefect API,
marks that flow run Crashed instead of leaving it Running forever.

Why a file in dest and not only Prefect's state: dest is the one thing every run of an archive
shares (the temporary Prefect API of `pulse run` dies with its process), and S3 and local
storage both offer atomic whole-object writes, which is all a lease needs. Clocks: the heartbeat
is compared with the reader's clock, so `stale_after` (default 10 minutes, 20 heartbeats) leaves
a wide margin for clock skew between machines. On the same host a dead PID is conclusive at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from pulse_core.errors import PulseError
from pulse_core.manifest import RUNS_PREFIX, AdoptReport, adopt_leftovers, finalize_run
from pulse_core.storage import Storage, StorageNotFoundError

HEARTBEAT_S = 30.0  # how often a live run refreshes its lease
DEFAULT_STALE_AFTER = timedelta(minutes=10)  # no heartbeat for this long: the run is dead
LEASE_NAME = "lease.json"


def lease_key(run_id: str) -> str:
    return f"{RUNS_PREFIX}/{run_id}/{LEASE_NAME}"


@dataclass
class LeaseRecord:
    """What a lease file holds."""

    run_id: str
    host: str
    pid: int
    started_at: str  # ISO 8601, UTC
    heartbeat_at: str  # ISO 8601, UTC
    finished: str | None = None  # None while running; "completed" | "failed" | "crashed"
    message: str = ""
    adopted_by: str | None = None  # the run that took over its leftovers, once one has

    @property
    def needs_adoption(self) -> bool:
        """A run that ended badly and whose leftovers no later run has taken over yet."""
        return self.adopted_by is None and self.finished not in (None, "completed")

    def heartbeat(self) -> datetime:
        return datetime.fromisoformat(self.heartbeat_at)

    def is_stale(self, now: datetime, stale_after: timedelta) -> bool:
        """Not finished, and either its heartbeat is old or its process is gone (same host)."""
        if self.finished is not None:
            return False
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return now - self.heartbeat() > stale_after


class RunLease:
    """Held by a running run: `with RunLease(dest, run_id): ...` heartbeats until the end.

    Leaving the block records `finished` = "completed", or "failed" with the exception's text.
    A failed heartbeat write (storage outage) is retried at the next beat; it never stops the run.
    """

    def __init__(self, dest: Storage, run_id: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        now = _now()
        self.dest = dest
        self.record = LeaseRecord(
            run_id=run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=now.isoformat(),
            heartbeat_at=now.isoformat(),
        )
        self._every = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        self._write()
        self._thread = threading.Thread(
            target=self._beat, name=f"lease-{self.record.run_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.record.finished = "failed" if exc is not None else "completed"
        self.record.message = "" if exc is None else f"{type(exc).__name__}: {exc}"[:500]
        # After a failure the store may be what failed: one try, no retry budget. If it does
        # not land, the next run finds a stale lease and adopts all the same.
        store = self.dest if exc is None else self.dest.with_retry_budget(0)
        with contextlib.suppress(PulseError):
            self._write(store)

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._write()
            except PulseError:
                continue

    def _write(self, store: Storage | None = None) -> None:
        self.record.heartbeat_at = _now().isoformat()
        write_lease(store or self.dest, self.record)


def read_leases(dest: Storage) -> list[LeaseRecord]:
    """Every run lease under dest's `_runs/` (unreadable ones are skipped: a lease is advisory)."""
    leases = []
    for info in dest.list(prefix=f"{RUNS_PREFIX}/", suffixes=(".json",)):
        if not info.key.endswith("/" + LEASE_NAME):
            continue
        try:
            raw = json.loads(dest.read_bytes(info.key))
            leases.append(LeaseRecord(**raw))
        except (StorageNotFoundError, ValueError, TypeError):
            continue
    return leases


def runs_to_adopt(
    dest: Storage, current_run_id: str, stale_after: timedelta = DEFAULT_STALE_AFTER
) -> list[LeaseRecord]:
    """Other runs that died (stale lease: marked "crashed" here) or failed, not yet adopted."""
    now = _now()
    found = []
    for lease in read_leases(dest):
        if lease.run_id == current_run_id:
            continue
        if lease.is_stale(now, stale_after):
            lease.finished = "crashed"
            lease.message = (
                f"no heartbeat since {lease.heartbeat_at} (process {lease.pid} on {lease.host})"
            )
        if lease.needs_adoption:
            found.append(lease)
    return found


def mark_adopted(dest: Storage, lease: LeaseRecord, by_run_id: str) -> None:
    """Record that a later run took over this run's leftovers, so it is not adopted again."""
    lease.adopted_by = by_run_id
    write_lease(dest, lease)


def write_lease(dest: Storage, lease: LeaseRecord) -> None:
    """One whole-object write: a reader sees the old lease or the new one, never half."""
    data = json.dumps(asdict(lease), indent=1).encode()
    dest.write_bytes(lease_key(lease.run_id), data, content_type="application/json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Adoption:
    """What a run took over from earlier ones before starting its own work."""

    leases: list[LeaseRecord]  # runs that crashed (stale lease) or failed, now finalised
    problems: list[tuple[str, str]]  # (run id, reason) not adoptable now; the next run retries
    orphans: AdoptReport  # parts of runs without a live lease, stale temp files


def adopt_crashed_runs(
    dest: Storage, current_run_id: str, stale_after: timedelta = DEFAULT_STALE_AFTER
) -> Adoption:
    """Finish what dead or failed runs left: merge their parts into their run manifests.

    First the runs known by their lease (crashed: stale heartbeat; failed: said so), then any
    parts of runs without a live lease whose newest part is older than `stale_after` (runs of
    older builds, runs killed before their first heartbeat), and stale `.pulse-tmp-*` files.
    Finalisation is idempotent, so adopting twice is harmless.
    """
    leases: list[LeaseRecord] = []
    problems: list[tuple[str, str]] = []
    now = _now()
    live = {
        lease.run_id
        for lease in read_leases(dest)
        if lease.finished is None and not lease.is_stale(now, stale_after)
    }
    for lease in runs_to_adopt(dest, current_run_id, stale_after):
        try:
            finalize_run(dest, lease.run_id)
            mark_adopted(dest, lease, current_run_id)
        except PulseError as exc:
            problems.append((lease.run_id, str(exc)))
            continue
        leases.append(lease)
    orphans = adopt_leftovers(
        dest, current_run_id=current_run_id, older_than=stale_after, live_runs=live
    )
    problems += list(orphans.failed_runs)
    return Adoption(leases, problems, orphans)
