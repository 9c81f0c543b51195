"""`pulse upsample INPUT... --out OUT`: the pipeline on local files, without Prefect.

The same steps as the flow (`pulse_core.pipeline`): same input suffixes, output names, PNGs,
contact sheets, Parquet manifests and index, and the same run summary behind the table and
`--json`. Every input is attempted; a bad one is recorded with its reason and the others go on.
The exit status is 1 when any input failed, and the failures are listed with their reasons.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch

from pulse_cli.options import add_settings_arguments, settings_from_args
from pulse_cli.progress import ProgressBar
from pulse_core.devices import pick_device
from pulse_core.generators.base import Generator
from pulse_core.generators.loading import load_generator
from pulse_core.lease import RunLease, adopt_crashed_runs
from pulse_core.pipeline import (
    IMAGE_SUFFIXES,
    BatchOutcome,
    RunSummary,
    RunTally,
    finalize_run,
    find_collisions,
    process_batch,
    summarise,
)
from pulse_core.settings import RestoreSettings
from pulse_core.storage import LocalStorage

SUMMARY_NAME = "summary.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upsample",
        help="restore local images into a folder",
        description="Restore local LR images (files or folders) into OUT with the same pipeline as "
        "`pulse run`: per input a folder with the HR samples, their downscales (the LR check) and "
        "a contact sheet; Parquet manifests in OUT/_runs/ and OUT/_manifest/; a summary table "
        "(and OUT/summary.json) at the end. Exits 1 if any input failed, naming it and why.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files or folders (scanned recursively)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_settings_arguments(p)
    p.set_defaults(func=run_upsample)


def collect_inputs(paths: list[str], out: Path) -> tuple[Path, list[str]]:
    """(root, keys): the inputs as keys relative to their common folder, in a stable order.

    Folders are scanned recursively for image suffixes (skipping OUT if it lies inside);
    files are taken as given, so a missing or odd file becomes a recorded failure, not a crash.
    Keys relative to the common folder keep inputs of different folders apart in OUT.
    """
    out = Path(os.path.abspath(out))
    files: list[Path] = []
    folders: list[Path] = []
    for raw in paths:
        p = Path(os.path.abspath(raw))
        if p.is_dir():
            folders.append(p)
            files += sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not f.is_relative_to(out)
                and not f.name.startswith(".")
            )
        else:
            files.append(p)
    if not files:
        return out, []
    root = Path(os.path.commonpath([*folders, *(f.parent for f in files)]))
    keys = list(dict.fromkeys(f.relative_to(root).as_posix() for f in files))
    return root, keys


def run_upsample(args: argparse.Namespace) -> int:
    settings = settings_from_args(args).resolved()
    out = Path(args.out)
    root, keys = collect_inputs(args.inputs, out)
    if not keys:
        print("pulse upsample: no input images found", file=sys.stderr)
        return 2
    say = (lambda *a: print(*a, file=sys.stderr)) if not args.json else (lambda *a: None)
    device = pick_device(settings.device)
    say(f"loading model {settings.model} on {device}...")
    generator = load_generator(settings.model, device, allow_download=True)
    config = settings.config
    say(f"model: {generator.describe()}")
    say(
        f"{len(keys)} input(s), {settings.samples} sample(s) each, preset {settings.preset}, "
        f"{config.steps} steps, eps {config.eps:g}"
    )
    source, dest = LocalStorage(root), LocalStorage(out)
    dest.check(create=True)
    run_id = f"upsample-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    per_batch = max(1, settings.planning_rows // settings.restarts)
    batches = [keys[i : i + per_batch] for i in range(0, len(keys), per_batch)]

    adoption = adopt_crashed_runs(dest, run_id)
    for lease in adoption.leases:
        say(f"finished the manifests of an earlier run that {lease.finished}: {lease.run_id}")
    with RunLease(dest, run_id):
        outcomes, seconds = _restore_batches(
            batches, source, dest, settings, run_id, args, generator
        )
        files = finalize_run(dest, run_id)
    summary = summarise(
        run_id, str(root), str(out), settings, len(keys), 0, RunTally.of(outcomes), seconds, files
    )
    text = json.dumps(summary.to_dict(), indent=2, default=str)
    dest.write_bytes(SUMMARY_NAME, text.encode(), content_type="application/json")
    if args.json:
        print(text)
    else:
        print_table(summary)
        print(
            f"\nresults in {out}/ (one folder per input: sample-K.png, sample-K-lr.png, "
            f"sheet.png); manifests: {summary.samples_key}; summary: {out / SUMMARY_NAME}"
        )
    if summary.failures:
        print(f"\n{summary.failed} of {summary.attempted} input(s) failed:", file=sys.stderr)
        for key, reason in summary.failures:
            print(f"  {key}: {reason}", file=sys.stderr)
        return 1
    return 0


def _restore_batches(
    batches: list[list[str]],
    source: LocalStorage,
    dest: LocalStorage,
    settings: RestoreSettings,
    run_id: str,
    args: argparse.Namespace,
    generator: Generator,
) -> tuple[list[BatchOutcome], float]:
    """Every batch through the pipeline, with a progress bar per batch."""
    collisions = find_collisions([k for batch in batches for k in batch])
    started = time.perf_counter()
    outcomes: list[BatchOutcome] = []
    for n, batch in enumerate(batches):
        bar = ProgressBar(
            _planned_steps(len(batch), settings),
            f"batch {n + 1}/{len(batches)}",
            enabled=not args.json and not args.quiet,
        )

        def on_step(step: int, steps: int, conv: torch.Tensor, bar: ProgressBar = bar) -> None:
            bar.advance(f"converged {int(conv.sum())}/{conv.numel()}")

        try:
            outcomes.append(
                process_batch(
                    batch,
                    source,
                    dest,
                    settings,
                    run_id=run_id,
                    batch_id=f"{n:05d}",
                    collisions=collisions,
                    generator=generator,
                    on_step=on_step,
                )
            )
            bar.update(bar.total)
        finally:
            bar.close()
    return outcomes, time.perf_counter() - started


def _planned_steps(inputs: int, settings: RestoreSettings) -> int:
    """Optimiser steps a batch may run: every restart round the budget allows, plus resamples.

    An upper bound (early stop and inputs that converge in the first round end sooner); the
    bar is completed when the batch returns.
    """
    config = settings.config
    searches = math.ceil(inputs * settings.restarts / settings.planning_rows)
    total = searches * config.steps * math.ceil(config.restart_budget)
    if settings.resample:
        total += math.ceil(inputs * settings.resample / settings.planning_rows) * 30
    return total


def print_table(summary: RunSummary) -> None:
    """One line per input: converged samples, best LR error, status."""
    rows = [("input", "converged", "best MSE", "status")]
    for i in summary.inputs:
        rows.append(
            (
                i.input_key,
                f"{i.converged_count}/{i.sample_count}" if i.status == "ok" else "-",
                f"{i.best_mse:.2e}" if i.best_mse is not None else "-",
                i.status,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"\n{summary.ok} restored, {summary.failed} failed; {summary.converged_input_count} with "
        f"a converged sample, in {summary.seconds:.1f} s"
    )
    if summary.no_faces or summary.faces_restored:
        print(
            f"faces: {summary.faces_restored} restored; {summary.no_faces} photo(s) without a face"
        )
