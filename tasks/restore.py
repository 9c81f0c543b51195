"""Task: restore one batch of inputs on whatever device the worker has."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.runtime import task_run as current_task
from prefect.states import Completed, State

from flows.report import shorten
from pulse_core.pipeline import BatchOutcome, process_batch
from pulse_core.settings import RestoreSettings
from pulse_core.storage import RetryBudgetExhaustedError, Storage, is_transient


def retry_transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a batch only for transient storage errors: bad input is already a failed row.

    Not when the storage retry budget is spent (`RetryBudgetExhaustedError`): every request
    already waited that long for the store, and retrying the batch three more times would
    turn a budget of minutes into a quarter of an hour before the run says what is wrong.
    """
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc) and not isinstance(exc, RetryBudgetExhaustedError)
    return False


def _batch_name() -> str:
    """A batch task's name: its number and input range, so a failed one is found by name."""
    params = current_task.parameters
    keys = params.get("input_keys") or []
    batch = params.get("batch_id", "?")
    if not keys:
        return f"batch {batch}"
    span = (
        shorten(keys[0], 40)
        if len(keys) == 1
        else f"{shorten(keys[0], 40)} .. {shorten(keys[-1], 40)}"
    )
    return f"batch {batch} ({len(keys)}): {span}"


@task(
    name="restore-batch",
    tags=["gpu"],
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_transient_only,
    task_run_name=_batch_name,
)
def restore_batch(
    input_keys: list[str],
    source: Storage,
    dest: Storage,
    settings: RestoreSettings,
    run_id: str,
    batch_id: str,
    collisions: dict[str, str],
) -> BatchOutcome | State[BatchOutcome]:
    """Restore the batch; a batch with failed inputs ends in a named state, not plain green.

    Its inputs' failures are recorded rows, not a task failure (nothing to retry), but the run
    graph should show at a glance which batch holds them.
    """
    outcome = process_batch(
        input_keys, source, dest, settings, run_id=run_id, batch_id=batch_id, collisions=collisions
    )
    logger = get_run_logger()
    logger.info(
        "batch %s: %d ok, %d failed in %.1f s on %s (%s)",
        batch_id,
        outcome.ok_count,
        outcome.failed_count,
        outcome.seconds,
        outcome.device,
        outcome.worker,
    )
    for item in outcome.inputs:
        if item.status == "failed":
            logger.warning("failed %s: %s", item.input_key, item.error)
    if outcome.failed_count:
        counts = f"{outcome.ok_count} ok, {outcome.failed_count} failed"
        return Completed(name="CompletedWithFailures", message=counts, data=outcome)
    return outcome
