"""`pulse run SOURCE DEST`: the restore-archive flow, from the command line.

Uses a temporary Prefect API by default (nothing to start), or the server at PREFECT_API_URL.
The temporary API is a subprocess that can take well over Prefect's 20 s default to answer on a
loaded 2-core machine (measured: runs failed with "Timed out while attempting to connect to
ephemeral Prefect API server"), so the CLI raises that limit to `EPHEMERAL_STARTUP_TIMEOUT`
unless PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pulse_cli.options import (
    add_pipeline_arguments,
    add_settings_arguments,
    pipeline_from_args,
    settings_from_args,
)

EPHEMERAL_STARTUP_TIMEOUT = 180  # seconds; Prefect's own default is 20
TIMEOUT_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
REAL_SERVER_HINT = (
    "start a Prefect server once (`prefect server start`, or `make stack`) and point runs at it "
    "with PREFECT_API_URL=http://127.0.0.1:4200/api, or raise "
    f"{TIMEOUT_VARIABLE} (now {{timeout}} s)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="restore every pending image from SOURCE into DEST (the Prefect flow)",
        description="Run the restore-archive flow: SOURCE and DEST are s3://bucket/prefix or local "
        "folders. Inputs already restored in DEST are skipped (use --force to redo). Runs with a "
        "temporary Prefect API unless PREFECT_API_URL is set (its start-up may take up to "
        f"{TIMEOUT_VARIABLE} seconds, default {EPHEMERAL_STARTUP_TIMEOUT} here). Prints the "
        "summary and where the manifests are; exits 1 if more than --max-failures inputs failed.",
    )
    p.add_argument("source", help="s3://bucket/prefix or a local folder of LR images")
    p.add_argument("dest", help="s3://bucket/prefix or a local folder for results and manifests")
    add_settings_arguments(p)
    add_pipeline_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=run_flow)


def prepare_prefect_environment() -> str:
    """Offline-friendly Prefect defaults; returns where runs will be reported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(TIMEOUT_VARIABLE, str(EPHEMERAL_STARTUP_TIMEOUT))
    return os.environ.get("PREFECT_API_URL") or "a temporary local Prefect API"


def run_flow(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)  # checked before Prefect starts: bad options fail fast
    options = pipeline_from_args(args)
    where = prepare_prefect_environment()
    from flows.restore import TooManyFailures, restore_archive  # Prefect starts only when needed

    print(f"running restore-archive on {where}...", file=sys.stderr)
    try:
        summary = restore_archive(args.source, args.dest, settings=settings, options=options)
    except TooManyFailures as exc:
        print(f"pulse run: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if "ephemeral Prefect API" not in str(exc):
            raise
        hint = REAL_SERVER_HINT.format(timeout=os.environ[TIMEOUT_VARIABLE])
        print(f"pulse run: the temporary Prefect API did not start: {exc}\n{hint}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
        return 0
    print(
        f"\n{summary.ok} restored, {summary.failed} failed, {summary.skipped} already done "
        f"(of {summary.found} found); {summary.converged_input_count} with a converged sample."
    )
    if summary.no_faces or summary.faces_restored:
        print(
            f"faces: {summary.faces_restored} restored; {summary.no_faces} photo(s) without a face"
        )
    loss = summary.loss
    if loss and loss.inputs:
        print(
            f"best LR error per input: min {loss.min_error:.3g}, median {loss.median_error:.3g}, "
            f"max {loss.max_error:.3g}; {loss.steps} optimiser steps in {loss.attempts} searches"
        )
    if summary.samples_key:
        print(f"samples manifest: {summary.samples_key}\nlosses manifest:  {summary.losses_key}")
    root = summary.dest.rstrip("/")
    print(f"results: {root}/<input>/sample-K.png; index: {root}/_manifest/samples/")
    for key, reason in summary.failures:
        print(f"  failed {key}: {reason}", file=sys.stderr)
    return 0
