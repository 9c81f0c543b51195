"""The main job: restore every pending image of an archive (S3 or a folder) into dest.

Reads like its table of contents: check and discover, fan out batches, merge the manifests,
publish the table and report. The fan-out runs as a nested flow so that its task runner (threads
on one box, or Dask GPU workers) can be chosen per run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import time
from datetime import UTC, datetime

import dask
from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.runtime import deployment, flow_run
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.recovery import adopt_crashed
from flows.report import job_key, report_markdown, results_table, shorten
from pulse_core.errors import PulseError
from pulse_core.lease import RunLease
from pulse_core.manifest import finalize_run
from pulse_core.pipeline import (
    BatchOutcome,
    Discovery,
    RunSummary,
    RunTally,
    read_plan,
    summarise,
    write_plan,
)
from pulse_core.settings import PipelineOptions, RestoreSettings
from pulse_core.storage import Storage, StorageConfig, open_storage
from tasks.discover import discover_inputs
from tasks.publish import finalize_manifests, make_links, make_previews, publish_artifacts
from tasks.restore import restore_batch


class TooManyFailures(PulseError):
    """More inputs failed than `max_failures` allows (everything else was still finished)."""


def _run_name() -> str:
    source = str(flow_run.parameters.get("source", "?"))
    return f"restore {shorten(source, 60)} {datetime.now(UTC):%Y-%m-%d %H:%M}"


def _batches_name() -> str:
    """The fan-out's name in the run graph: what it restores and how much."""
    params = flow_run.parameters
    source = getattr(params.get("source"), "url", params.get("source", "?"))
    total = params.get("total_inputs")
    size = f": {total} inputs" if total is not None else ""
    return f"batches of {shorten(str(source), 60)}{size}"


def run_tags(settings: RestoreSettings) -> list[str]:
    """Tags of a run and everything under it: the product, the model and the preset.

    A model given as a path is tagged by its file name (tags are for filtering, not paths).
    """
    model = settings.model.rstrip("/").rsplit("/", 1)[-1]
    return ["pulse", f"model:{model}", f"preset:{settings.preset}"]


def _add_tags(new: list[str]) -> None:
    """Add tags to the running flow run (a deployment's run was created with its own tags).

    Best effort: tags are for finding runs, never a reason to fail one.
    """
    run_id = flow_run.id
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(run_id).tags
            merged = [*current, *(t for t in new if t not in current)]
            if merged != current:
                client.update_flow_run(run_id, tags=merged)
    except Exception as exc:  # the API busy or older: the run goes on untagged
        get_run_logger().warning("could not tag the run: %s", exc)


# Batches submitted but not finished, per worker slot: enough that a worker never waits for the
# flow to hand it the next batch, few enough that an archive is not queued whole (1M inputs in
# batches of 8 were 125k task runs created and held at once; now 4 per slot, e.g. 64 for 16 GPUs).
IN_FLIGHT_PER_WORKER = 4
FAILURES_LOGGED = 200  # failed inputs named in the run's log; the manifest has every one
MIN_IN_FLIGHT = 2


# persist_result: the engine may hand back the API's copy of the final state (a retried state
# update on a busy API), which carries no data; a persisted result is read back from storage.
@flow(name="restore-batches", flow_run_name=_batches_name, persist_result=True)
def restore_batches(
    plan_key: str,
    source: Storage,
    dest: Storage,
    settings: RestoreSettings,
    run_id: str,
    inputs_per_task: int,
    collisions: dict[str, str],
    gpu_resource: bool,
    progress_id: str | None,
    max_in_flight: int | None = None,
    total_inputs: int | None = None,
) -> RunTally:
    """Fan out one task per batch of the plan, at most `max_in_flight` at a time.

    The plan (the pending keys) is read from dest, not passed as a parameter: Prefect stores a
    flow's parameters in its API, and a million keys are ~40 MB of JSON. The next batch is
    submitted as each one finishes, so task runs, futures and their results stay bounded however
    large the archive; outcomes are folded into a bounded `RunTally` as they arrive.
    max_in_flight None: IN_FLIGHT_PER_WORKER per worker slot of the task runner (its threads, or
    the Dask workers' threads), at least MIN_IN_FLIGHT. A batch that fails for good fails the
    flow; batches already submitted still finish, later ones never start.
    """
    pending = read_plan(dest, plan_key)
    total = -(-len(pending) // inputs_per_task)
    bound = max(MIN_IN_FLIGHT, max_in_flight or _in_flight_bound())
    annotations = {"resources": {"GPU": 1}} if gpu_resource else {}
    finished: queue.SimpleQueue[PrefectFuture[BatchOutcome]] = queue.SimpleQueue()
    todo = enumerate(pending.batches(inputs_per_task))
    in_flight = 0

    def submit_next() -> bool:
        nonlocal in_flight
        item = next(todo, None)
        if item is None:
            return False
        n, keys = item
        with dask.annotate(**annotations):
            future = restore_batch.submit(
                keys, source, dest, settings, run_id, f"{n:05d}", collisions
            )
        in_flight += 1
        future.add_done_callback(finished.put)
        return True

    while in_flight < bound and submit_next():
        pass
    tally = RunTally()
    logger = get_run_logger()
    logger.info("%d batches, at most %d in flight", total, bound)
    while in_flight:
        future = finished.get()
        in_flight -= 1
        tally.add(future.result())
        submit_next()
        if progress_id:
            update_progress_artifact(progress_id, progress=100.0 * tally.batches / total)
        logger.info("%d/%d batches done", tally.batches, total)
    return tally


def _in_flight_bound() -> int:
    """IN_FLIGHT_PER_WORKER x the worker slots of the running flow's task runner."""
    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    slots = os.cpu_count() or 1  # a runner that does not say (threads without max_workers)
    if isinstance(runner, ThreadPoolTaskRunner):
        threads = getattr(runner, "_max_workers", sys.maxsize)  # Prefect keeps it private
        slots = threads if threads < sys.maxsize else slots
    elif isinstance(runner, DaskTaskRunner):
        with contextlib.suppress(Exception):  # no cluster info: keep the CPU count
            slots = sum(runner.client.nthreads().values()) or slots
    return IN_FLIGHT_PER_WORKER * slots


@flow(name="restore-archive", flow_run_name=_run_name, log_prints=True, persist_result=True)
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
    labels = run_tags(settings)
    _add_tags(labels)
    storage_config = StorageConfig(endpoint_url=options.storage_endpoint)
    src, dst = open_storage(source, storage_config), open_storage(dest, storage_config)
    run_id = str(flow_run.id or f"local-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    run_key = job_key(dst.url, deployment.name)  # each archive keeps its own artifact history

    with tags(*labels):  # the sub-run and every task carry the run's tags
        found = discover_inputs(src, dst, settings.samples, options.force, options.limit)
        with RunLease(dst, run_id):  # heartbeats; a later run adopts what a crash leaves
            adopt_crashed(dst, run_id)
            tally, seconds = _fan_out(found, src, dst, settings, options, run_id, run_key)
            files = finalize_manifests(dst, run_id) if tally.batches else None
            summary = summarise(
                run_id, src.url, dst.url, settings, found.total, found.done, tally, seconds, files
            )
            if files is not None:  # a run with nothing to do keeps the last real results in view
                table = results_table(tally.inputs, settings.config.eps, dst.url)
                previews = make_previews(dst, tally.inputs)
                report = report_markdown(summary, previews, make_links(dst, files))
                publish_artifacts(table, report, run_key)
    counts = f"{summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped"
    logger.info("%s; manifests: %s", counts, summary.samples_key or "(none: nothing to do)")
    for key, reason in summary.failures[:FAILURES_LOGGED]:
        logger.warning("failed input %s: %s", key, reason)
    if len(summary.failures) > FAILURES_LOGGED:
        more = summary.failed - FAILURES_LOGGED
        logger.warning("... and %d more failed inputs (see the manifest)", more)
    if summary.failed:
        _add_tags(["failures"])  # findable in the runs list, whatever the final state
    if summary.failed > options.max_failures:
        reasons = "; ".join(f"{k}: {r}" for k, r in summary.failures[:5])
        raise TooManyFailures(
            f"{counts}: {summary.failed} input(s) failed (max_failures={options.max_failures}); "
            f"everything else was finished and recorded. First: {reasons}"
        )
    if not tally.batches:
        return Completed(message=f"nothing to do: {counts}", data=summary)
    if summary.failed:  # within max_failures: green, but not the same green
        return Completed(name="CompletedWithFailures", message=counts, data=summary)
    return Completed(message=counts, data=summary)


def _fan_out(
    found: Discovery,
    src: Storage,
    dst: Storage,
    settings: RestoreSettings,
    options: PipelineOptions,
    run_id: str,
    run_key: str,
) -> tuple[RunTally, float]:
    """Run every batch; if the fan-out fails, merge what finished before re-raising."""
    logger = get_run_logger()
    progress_id = str(
        create_progress_artifact(0.0, key=f"{run_key}-progress", description="Batches done (%)")
    )
    started = time.perf_counter()
    if not len(found.pending):
        update_progress_artifact(progress_id, progress=100.0)
        logger.info("nothing to do: every input in %s is already restored in %s", src.url, dst.url)
        return RunTally(), time.perf_counter() - started
    plan_key = write_plan(dst, run_id, found.pending)
    try:
        tally = restore_batches.with_options(task_runner=_task_runner(options))(
            plan_key,
            src,
            dst,
            settings,
            run_id,
            options.inputs_per_task,
            found.collisions,
            options.gpu_resource and options.task_runner == "dask",
            progress_id,
            total_inputs=len(found.pending),
        )
    except BaseException:
        # Batches that finished wrote their parts: merge them now, best effort with no retry
        # budget (the store may be what failed: waiting minutes again helps nobody); whatever
        # is left, the next run adopts.
        with contextlib.suppress(PulseError):
            finalize_run(dst.with_retry_budget(0), run_id)
        raise
    dst.delete(plan_key)  # done with; a crashed run's plan stays beside its parts
    return tally, time.perf_counter() - started


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
