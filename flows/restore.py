"""The main job: restore every pending image of an archive (S3 or a folder) into dest.

Reads like its table of contents: check and discover, fan out batches, merge the manifests,
publish the table and report. The fan-out runs as a nested flow so that its task runner (threads
on one box, or Dask GPU workers) can be chosen per run.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.recovery import adopt_crashed
from flows.report import report_markdown, results_table
from pulse_core.errors import PulseError
from pulse_core.lease import RunLease
from pulse_core.manifest import finalize_run
from pulse_core.pipeline import BatchOutcome, Discovery, RunSummary, summarise
from pulse_core.settings import PipelineOptions, RestoreSettings
from pulse_core.storage import Storage, StorageConfig, open_storage
from tasks.discover import discover_inputs
from tasks.publish import finalize_manifests, publish_artifacts
from tasks.restore import restore_batch


class TooManyFailures(PulseError):
    """More inputs failed than `max_failures` allows (everything else was still finished)."""


def _run_name() -> str:
    params = flow_run.parameters
    source = str(params.get("source", "?")).rstrip("/")
    short = source if len(source) <= 60 else "..." + source[-57:]
    return f"restore {short} {datetime.now(UTC):%Y-%m-%d %H:%M}"


@flow(name="restore-batches", flow_run_name="restore-batches-{run_id}")
def restore_batches(
    batches: list[list[str]],
    source: Storage,
    dest: Storage,
    settings: RestoreSettings,
    run_id: str,
    collisions: dict[str, str],
    gpu_resource: bool,
    progress_id: str | None,
) -> list[BatchOutcome]:
    """Fan out one task per batch; update the progress artifact as batches finish."""
    annotations = {"resources": {"GPU": 1}} if gpu_resource else {}
    with dask.annotate(**annotations):
        futures = [
            restore_batch.submit(keys, source, dest, settings, run_id, f"{n:05d}", collisions)
            for n, keys in enumerate(batches)
        ]
    outcomes: list[BatchOutcome] = []
    logger = get_run_logger()
    for future in as_completed(futures):
        outcomes.append(future.result())
        done = len(outcomes)
        if progress_id:
            update_progress_artifact(progress_id, progress=100.0 * done / len(futures))
        logger.info("%d/%d batches done", done, len(futures))
    return sorted(outcomes, key=lambda o: o.batch_id)


@flow(name="restore-archive", flow_run_name=_run_name, log_prints=True)
def restore_archive(
    source: str,
    dest: str,
    settings: RestoreSettings = RestoreSettings(),  # noqa: B008 (frozen: safe as a default)
    options: PipelineOptions = PipelineOptions(),  # noqa: B008
) -> RunSummary:
    """Restore every image under `source` not yet restored in `dest`.

    source/dest: `s3://bucket/prefix` or a local folder. settings: what to restore with (model,
    samples, preset, and `search` to set every search option; empty = the preset's). options:
    how to run it (inputs per task, threads or Dask, limits, failures allowed). Fails at the
    end, after everything else is written, if more than options.max_failures inputs failed.
    """
    logger = get_run_logger()
    settings = settings.resolved()  # preset + overrides -> the effective values, once
    storage_config = StorageConfig(endpoint_url=options.storage_endpoint)
    src, dst = open_storage(source, storage_config), open_storage(dest, storage_config)
    run_id = str(flow_run.id or f"local-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    run_key = "restore"

    found = discover_inputs(src, dst, settings.samples, options.force, options.limit)
    with RunLease(dst, run_id):  # heartbeats; a later run adopts what a crash leaves
        adopt_crashed(dst, run_id)
        outcomes, seconds = _fan_out(found, src, dst, settings, options, run_id, run_key)
        files = finalize_manifests(dst, run_id) if outcomes else None
        summary = summarise(
            run_id, src.url, dst.url, settings, found.total, found.done, outcomes, seconds, files
        )
        publish_artifacts(results_table(outcomes), report_markdown(summary), run_key)
    logger.info(
        "%d ok, %d failed, %d skipped; manifests: %s",
        summary.ok,
        summary.failed,
        summary.skipped,
        summary.samples_key or "(none: nothing ran)",
    )
    if summary.failed > options.max_failures:
        reasons = "; ".join(f"{k}: {r}" for k, r in summary.failures[:5])
        raise TooManyFailures(
            f"{summary.failed} input(s) failed (max_failures={options.max_failures}); everything "
            f"else was finished and recorded. First: {reasons}"
        )
    return summary


def _fan_out(
    found: Discovery,
    src: Storage,
    dst: Storage,
    settings: RestoreSettings,
    options: PipelineOptions,
    run_id: str,
    run_key: str,
) -> tuple[list[BatchOutcome], float]:
    """Run every batch; if the fan-out fails, merge what finished before re-raising."""
    logger = get_run_logger()
    size = options.inputs_per_task
    batches = [found.pending[i : i + size] for i in range(0, len(found.pending), size)]
    progress_id = str(
        create_progress_artifact(0.0, key=f"{run_key}-progress", description="Batches done (%)")
    )
    started = time.perf_counter()
    if not batches:
        update_progress_artifact(progress_id, progress=100.0)
        logger.info("nothing to do: every input in %s is already restored in %s", src.url, dst.url)
        return [], time.perf_counter() - started
    try:
        outcomes = restore_batches.with_options(task_runner=_task_runner(options))(
            batches,
            src,
            dst,
            settings,
            run_id,
            found.collisions,
            options.gpu_resource and options.task_runner == "dask",
            progress_id,
        )
    except BaseException:
        # Batches that finished wrote their parts: merge them now (or the next run adopts them).
        with contextlib.suppress(PulseError):
            finalize_run(dst, run_id)
        raise
    return outcomes, time.perf_counter() - started


def _task_runner(options: PipelineOptions) -> ThreadPoolTaskRunner | DaskTaskRunner:
    if options.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=options.max_workers)
    if options.dask_address:
        return DaskTaskRunner(address=options.dask_address)
    cluster_kwargs: dict[str, object] = {
        "n_workers": options.max_workers,
        "threads_per_worker": 1,
        "processes": True,
    }
    if options.gpu_resource:
        cluster_kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_kwargs=cluster_kwargs)
