"""`pulse run SOURCE DEST`: the restore-archive flow, from the command line.

Uses the temporary Prefect API by default (nothing to start), or the server at PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pulse_cli.upsample import add_search_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="restore every pending image from SOURCE into DEST (the Prefect flow)",
        description="Run the restore-archive flow: SOURCE and DEST are s3://bucket/prefix or local "
        "folders. Inputs already restored in DEST are skipped (use --force to redo). Runs with the "
        "temporary Prefect API unless PREFECT_API_URL is set. Prints the summary and where the "
        "manifests are; exits 1 if more than --max-failures inputs failed.",
    )
    p.add_argument("source", help="s3://bucket/prefix or a local folder of LR images")
    p.add_argument("dest", help="s3://bucket/prefix or a local folder for results and manifests")
    add_search_arguments(p)
    g = p.add_argument_group("pipeline")
    g.add_argument(
        "--task-runner", choices=("threads", "dask"), default="threads", help="default: threads"
    )
    g.add_argument(
        "--dask-address",
        help="tcp://host:8786 of an existing Dask cluster (with --task-runner dask)",
    )
    g.add_argument(
        "--max-workers", type=int, default=1, help="threads, or LocalCluster workers (default 1)"
    )
    g.add_argument(
        "--inputs-per-task", type=int, default=8, help="inputs per restore task (default 8)"
    )
    g.add_argument("--limit", type=int, help="restore at most this many pending inputs")
    g.add_argument("--force", action="store_true", help="redo inputs that are already restored")
    g.add_argument(
        "--max-failures",
        type=int,
        default=0,
        help="failed inputs allowed before the run fails (default 0)",
    )
    g.add_argument(
        "--no-gpu-resource",
        action="store_true",
        help="do not require Dask workers with resource GPU=1",
    )
    g.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=run_flow)


def run_flow(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.restore import TooManyFailures, restore_archive  # Prefect starts only when needed

    where = os.environ.get("PREFECT_API_URL") or "a temporary local Prefect API"
    print(f"running restore-archive on {where}...", file=sys.stderr)
    params = dict(
        source=args.source,
        dest=args.dest,
        model=args.model,
        samples=args.samples,
        resample=args.resample,
        preset=args.preset,
        steps=args.steps,
        eps=args.eps,
        loss=args.loss,
        operator=args.operator,
        early_stop=args.early_stop,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        schedule=args.schedule,
        noise_mode=args.noise_mode,
        intermediate_layers=None
        if args.intermediate_layers is None
        else list(args.intermediate_layers),
        intermediate_radius=args.intermediate_radius,
        restart_budget=args.restart_budget,
        search_batch=args.batch_size,
        seed=args.seed,
        fit=args.fit,
        device=args.device,
        batch_size=args.inputs_per_task,
        task_runner=args.task_runner,
        dask_address=args.dask_address,
        max_workers=args.max_workers,
        limit=args.limit,
        force=args.force,
        max_failures=args.max_failures,
        gpu_resource=not args.no_gpu_resource,
        storage_endpoint=args.endpoint_url,
    )
    try:
        summary = restore_archive(**params)
    except TooManyFailures as exc:
        print(f"pulse run: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
        return 0
    print(
        f"\n{summary.ok} restored, {summary.failed} failed, {summary.skipped} already done "
        f"(of {summary.found} found); {summary.converged_inputs} with a converged sample."
    )
    if summary.samples_key:
        print(f"samples manifest: {summary.samples_key}\nlosses manifest:  {summary.losses_key}")
    print(
        f"results: {summary.dest.rstrip('/')}/<input>/sample-K.png; index: {summary.dest.rstrip('/')}/_manifest/samples/"
    )
    for key, reason in summary.failures:
        print(f"  failed {key}: {reason}", file=sys.stderr)
    return 0
