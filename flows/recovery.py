"""Task: take over what crashed or failed runs of the same dest left behind.

A run killed outright (SIGKILL, a lost node) cannot clean up after itself: its batch parts stay
under `_runs/<id>/parts/`, its index rows cite a run with no manifest, and its flow run stays
Running in Prefect. The next run of the same dest finds it by its stale lease
(`pulse_core.lease`), merges its parts, and marks the flow run Crashed with the reason.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

from pulse_core.lease import DEFAULT_STALE_AFTER, LeaseRecord, adopt_crashed_runs
from pulse_core.storage import Storage

OPEN_STATES = (StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.PAUSED)


@task(name="adopt-crashed-runs", tags=["io"])
def adopt_crashed(
    dest: Storage, run_id: str, stale_after_s: float = DEFAULT_STALE_AFTER.total_seconds()
) -> list[str]:
    """Adopt the leftovers of earlier runs that died or failed; returns their run ids."""
    logger = get_run_logger()
    adoption = adopt_crashed_runs(dest, run_id, timedelta(seconds=stale_after_s))
    for lease in adoption.leases:
        logger.warning(
            "adopted the leftovers of run %s (%s: %s)", lease.run_id, lease.finished, lease.message
        )
        if lease.finished == "crashed":
            _mark_crashed(lease, run_id, logger)
    for other in adoption.orphans.adopted_runs:
        logger.warning("merged the leftover parts of run %s (no live lease)", other)
    if adoption.orphans.removed_temp_files:
        logger.info("removed %d stale temp file(s)", len(adoption.orphans.removed_temp_files))
    for other, reason in adoption.problems:
        logger.warning("could not adopt run %s yet (next run retries): %s", other, reason)
    return [lease.run_id for lease in adoption.leases] + list(adoption.orphans.adopted_runs)


def _mark_crashed(lease: LeaseRecord, by_run_id: str, logger) -> None:
    """Set a dead run's flow run to Crashed, if this Prefect API knows it and it is still open."""
    try:
        flow_run_id = uuid.UUID(lease.run_id)
    except ValueError:
        return  # a run outside Prefect (pulse upsample, local-...): nothing to mark
    message = f"Crashed: {lease.message}; leftovers adopted by run {by_run_id}"
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            if run.state is None or run.state.type not in OPEN_STATES:
                return
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
        logger.warning("marked flow run %s Crashed", lease.run_id)
    except Exception as exc:  # unknown to this API (another server), or the API is down
        logger.info("flow run %s not marked Crashed here: %s", lease.run_id, exc)
