"""The `evaluate` flow: measure restorations of ground truths against baselines, as a job.

Reads like its table of contents: list the ground truths, fan out one task per batch (threads,
at most `settings.max_workers` at once), merge and report, publish artifacts. Every step is a
`pulse_core.evaluation` call; `pulse eval --no-prefect` runs the same calls without Prefect.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.report import job_key
from pulse_core.evaluation.job import plan, sheet_inputs
from pulse_core.evaluation.report import (
    PLOTS,
    REPORT_KEY,
    EvalSummary,
    finish_evaluation,
    markdown_table,
)
from pulse_core.evaluation.run import BatchEval, evaluate_batch, list_ground_truths
from pulse_core.evaluation.settings import EvalSettings
from pulse_core.storage import Storage, StorageConfig, open_storage
from tasks.restore import retry_transient_only

IMAGE_LINK_SECONDS = 7 * 24 * 3600  # presigned plot URLs in the UI stay valid a week


@task(
    name="evaluate-batch",
    tags=["gpu"],
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_transient_only,
    task_run_name="evaluate-batch-{batch_id}",
)
def evaluate_batch_task(
    keys: list[str],
    source: Storage,
    dest: Storage,
    settings: EvalSettings,
    run_id: str,
    batch_id: str,
    sheets: list[str],
) -> BatchEval:
    outcome = evaluate_batch(
        keys, source, dest, settings, run_id=run_id, batch_id=batch_id, sheet_inputs=set(sheets)
    )
    get_run_logger().info(
        "batch %s: %d ground truths, %d LR inputs restored in %.1f s",
        batch_id,
        outcome.ground_truths,
        outcome.inputs,
        outcome.seconds,
    )
    return outcome


@task(name="finish-evaluation")
def finish_task(
    dest: Storage,
    run_id: str,
    source_url: str,
    settings: EvalSettings,
    batches: list[BatchEval],
    seconds: float,
) -> EvalSummary:
    return finish_evaluation(dest, run_id, source_url, settings, batches, seconds)


def _run_name() -> str:
    source = str(flow_run.parameters.get("source", "?")).rstrip("/")
    return f"evaluate {source[-60:]} {datetime.now(UTC):%Y-%m-%d %H:%M}"


@flow(name="evaluate", flow_run_name=_run_name, log_prints=True, persist_result=True)
def evaluate(
    source: str,
    dest: str,
    settings: EvalSettings = EvalSettings(),  # noqa: B008 (frozen: safe as a default)
) -> EvalSummary:
    """Evaluate every ground-truth image under `source` into `dest` (folders or s3://).

    Each image is downscaled by each factor (and degraded), restored with `settings.restore`
    through the same pipeline as `pulse run`, and measured with the baselines: `dest` gets
    eval.parquet, losses.parquet, summary.json, report.md, plots/ and sheets/.
    """
    logger = get_run_logger()
    settings = settings.resolved()
    storage = StorageConfig(endpoint_url=settings.storage_endpoint)
    src, dst = open_storage(source, storage), open_storage(dest, storage)
    dst.check(create=True)
    run_id = str(flow_run.id or f"eval-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    keys = list_ground_truths(src, settings.limit, dst)
    logger.info("%d ground truth(s) in %s", len(keys), src.url)
    started = time.perf_counter()
    batches = _fan_out.with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=settings.max_workers)
    )(keys, src, dst, settings, run_id)
    summary = finish_task(dst, run_id, src.url, settings, batches, time.perf_counter() - started)
    publish(summary, dst, job_key(dst.url).replace("restore-", "eval-", 1))
    for name, why in summary.missing.items():
        logger.warning("not measured: %s (%s)", name, why)
    print(markdown_table(summary.table))
    return summary


@flow(name="evaluate-batches", flow_run_name="evaluate-batches-{run_id}", persist_result=True)
def _fan_out(
    keys: list[str], src: Storage, dst: Storage, settings: EvalSettings, run_id: str
) -> list[BatchEval]:
    sheets = sorted(sheet_inputs(keys, settings))
    futures = [
        evaluate_batch_task.submit(batch, src, dst, settings, run_id, f"{n:05d}", sheets)
        for n, batch in enumerate(plan(keys, settings.inputs_per_task))
    ]
    return [f.result() for f in futures]


def publish(summary: EvalSummary, dest: Storage, key: str) -> None:
    """Table, report and plots as artifacts; image artifacts only where a browser can load one."""
    create_table_artifact(
        table=[{k: v for k, v in row.items() if v is not None} for row in summary.table],
        key=f"{key}-table",
        description="Evaluation: one row per factor, degradation and method",
    )
    report = dest.read_bytes(REPORT_KEY).decode()
    create_markdown_artifact(markdown=report, key=f"{key}-report", description="Evaluation report")
    for name in [p for p in summary.files.get("plots", "").split(", ") if p]:
        url = dest.share_url(name, IMAGE_LINK_SECONDS)
        if url is not None:
            create_image_artifact(image_url=url, key=f"{key}-{_slug(name)}")
        else:  # a local folder has no web address: a link to the file
            create_link_artifact(
                link=dest.uri(name),
                key=f"{key}-{_slug(name)}",
                description=f"{PLOTS} file of the evaluation",
            )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]


__all__ = ["evaluate", "evaluate_batch_task", "publish"]
