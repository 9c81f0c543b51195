"""A whole evaluation without Prefect: list, batch, evaluate each batch, finish.

The flow (`flows/evaluate.py`) runs the same three steps as Prefect tasks; this is what
`pulse eval --no-prefect`, the bench script and notebooks call.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from pulse_core.devices import pick_device
from pulse_core.evaluation.report import EvalSummary, finish_evaluation
from pulse_core.evaluation.run import BatchEval, evaluate_batch, list_ground_truths
from pulse_core.evaluation.settings import EvalSettings
from pulse_core.generators.base import Generator
from pulse_core.generators.loading import load_generator
from pulse_core.storage import StorageConfig, open_storage


def new_run_id(prefix: str = "eval") -> str:
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def plan(keys: list[str], per_batch: int) -> list[list[str]]:
    return [keys[i : i + per_batch] for i in range(0, len(keys), per_batch)]


def sheet_inputs(keys: list[str], settings: EvalSettings) -> set[str]:
    """The ground truths that get contact-sheet strips: the first `settings.sheets`."""
    return set(keys[: settings.sheets])


def evaluate(
    source: str,
    dest: str,
    settings: EvalSettings,
    *,
    generator: Generator | None = None,
    run_id: str | None = None,
    on_batch: Callable[[int, int, BatchEval], None] | None = None,
) -> EvalSummary:
    """Evaluate every ground truth under `source` (folder or s3://) into `dest`."""
    settings = settings.resolved()
    config = StorageConfig(endpoint_url=settings.storage_endpoint)
    src, dst = open_storage(source, config), open_storage(dest, config)
    dst.check(create=True)
    run_id = run_id or new_run_id()
    keys = list_ground_truths(src, settings.limit, dst)
    if generator is None:
        restore = settings.restore
        generator = load_generator(restore.model, pick_device(restore.device), allow_download=True)
    started = time.perf_counter()
    batches = plan(keys, settings.inputs_per_task)
    sheets = sheet_inputs(keys, settings)
    done: list[BatchEval] = []
    for n, batch in enumerate(batches):
        outcome = evaluate_batch(
            batch,
            src,
            dst,
            settings,
            run_id=run_id,
            batch_id=f"{n:05d}",
            sheet_inputs=sheets,
            generator=generator,
        )
        done.append(outcome)
        if on_batch is not None:
            on_batch(n + 1, len(batches), outcome)
    return finish_evaluation(
        dst, run_id, src.url, settings, done, seconds=time.perf_counter() - started
    )


__all__ = ["evaluate", "new_run_id", "plan", "sheet_inputs"]
