"""The main job: restore every pending image of an archive (S3 or a folder) into dest.

Reads like its table of contents: check and discover, fan out batches, merge the manifests,
publish the table and report. The fan-out runs as a nested flow so that its task runner (threads
on one box, or Dask GPU workers) can be chosen per run.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.report import RunSummary, report_markdown, results_table, summarise
from pulse_core.batch import BatchOutcome, RestoreSettings
from pulse_core.errors import ConfigError, PulseError
from pulse_core.search import DEFAULT_PRESET
from pulse_core.storage import Storage, StorageConfig, open_storage
from tasks.discover import discover_inputs
from tasks.publish import finalize_manifests, publish_artifacts
from tasks.restore import restore_batch

TASK_RUNNERS = ("threads", "dask")


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
    model: str = "demo",
    samples: int = 4,
    steps: int | None = None,
    eps: float | None = None,
    loss: str | None = None,
    operator: str | None = None,
    preset: str = DEFAULT_PRESET,
    batch_size: int = 8,
    task_runner: str = "threads",
    dask_address: str | None = None,
    max_workers: int = 1,
    limit: int | None = None,
    force: bool = False,
    max_failures: int = 0,
    seed: int = 0,
    fit: str = "center-crop",
    device: str = "auto",
    gpu_resource: bool = True,
    storage_endpoint: str | None = None,
    resample: int = 0,
    early_stop: bool | None = None,
    learning_rate: float | None = None,
    optimizer: str | None = None,
    schedule: str | None = None,
    noise_mode: str | None = None,
    intermediate_layers: list[str] | None = None,
    intermediate_radius: float | None = None,
    restart_budget: float | None = None,
    search_batch: int = 32,
) -> RunSummary:
    """Restore every image under `source` not yet restored in `dest`.

    source/dest: `s3://bucket/prefix` or a local folder. batch_size: inputs per task;
    search_batch: rows (inputs x samples) per forward pass inside a task. steps, eps, loss,
    operator, learning_rate, optimizer, schedule, noise_mode, early_stop, intermediate_layers
    (["auto"], split-point names, or [] for plain PULSE), intermediate_radius, restart_budget:
    None keeps the preset.
    task_runner: "threads" (max_workers threads in this process) or "dask" (a LocalCluster of
    max_workers workers, or the cluster at dask_address; tasks need a worker with resource GPU=1
    when gpu_resource). Fails at the end if more than max_failures inputs failed.
    """
    logger = get_run_logger()
    if task_runner not in TASK_RUNNERS:
        raise ConfigError(
            f"unknown task_runner {task_runner!r}; choose one of: {', '.join(TASK_RUNNERS)}"
        )
    if batch_size < 1 or max_workers < 1:
        raise ConfigError("batch_size and max_workers must be >= 1")
    settings = RestoreSettings(
        model=model,
        samples=samples,
        resample=resample,
        preset=preset,
        steps=steps,
        eps=eps,
        loss=loss,
        operator=operator,
        early_stop=early_stop,
        learning_rate=learning_rate,
        optimizer=optimizer,
        schedule=schedule,
        noise_mode=noise_mode,
        intermediate_layers=None if intermediate_layers is None else tuple(intermediate_layers),
        intermediate_radius=intermediate_radius,
        restart_budget=restart_budget,
        seed=seed,
        fit=fit,
        device=device,
        search_batch=search_batch,
    )
    settings.search_config()  # validate every search option before any work
    storage_config = StorageConfig(endpoint_url=storage_endpoint)
    src, dst = open_storage(source, storage_config), open_storage(dest, storage_config)
    run_id = str(flow_run.id or f"local-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    run_key = "restore"

    found = discover_inputs(src, dst, samples, force, limit)
    batches = [found.pending[i : i + batch_size] for i in range(0, len(found.pending), batch_size)]
    progress_id = str(
        create_progress_artifact(0.0, key=f"{run_key}-progress", description="Batches done (%)")
    )
    started = time.perf_counter()
    outcomes: list[BatchOutcome] = []
    if batches:
        runner = _task_runner(task_runner, dask_address, max_workers, gpu_resource)
        outcomes = restore_batches.with_options(task_runner=runner)(
            batches,
            src,
            dst,
            settings,
            run_id,
            found.collisions,
            gpu_resource and task_runner == "dask",
            progress_id,
        )
    else:
        update_progress_artifact(progress_id, progress=100.0)
        logger.info("nothing to do: every input in %s is already restored in %s", source, dest)
    seconds = time.perf_counter() - started

    summary = summarise(run_id, source, dest, settings, found.total, found.done, outcomes, seconds)
    if outcomes:
        files = finalize_manifests(dst, run_id)
        summary.samples_key = f"{dst.url.rstrip('/')}/{files.samples_key}"
        summary.losses_key = f"{dst.url.rstrip('/')}/{files.losses_key}"
    publish_artifacts(results_table(outcomes), report_markdown(summary), run_key)
    logger.info(
        "%d ok, %d failed, %d skipped; manifests: %s",
        summary.ok,
        summary.failed,
        summary.skipped,
        summary.samples_key or "(none: nothing ran)",
    )
    if summary.failed > max_failures:
        reasons = "; ".join(f"{k}: {r}" for k, r in summary.failures[:5])
        raise TooManyFailures(
            f"{summary.failed} input(s) failed (max_failures={max_failures}); everything else was "
            f"finished and recorded. First: {reasons}"
        )
    return summary


def _task_runner(kind: str, address: str | None, max_workers: int, gpu_resource: bool):
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if address:
        return DaskTaskRunner(address=address)
    cluster_kwargs = {"n_workers": max_workers, "threads_per_worker": 1, "processes": True}
    if gpu_resource:
        cluster_kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_kwargs=cluster_kwargs)
