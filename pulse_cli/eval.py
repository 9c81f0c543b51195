"""`pulse eval HR_SOURCE --out DEST`: measure restorations against ground truth and baselines.

Runs the `evaluate` flow (a temporary Prefect API unless PREFECT_API_URL is set, as `pulse run`
does) or, with `--no-prefect`, the same `pulse_core.evaluation` steps in this process with a
progress line per batch. Options: the evaluation's own (`EvalSettings`), then every restore and
search option of `pulse upsample`, generated from the same dataclasses.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields

from pulse_cli.options import _add_field, add_settings_arguments, settings_from_args
from pulse_core.evaluation.report import EvalSummary, markdown_table
from pulse_core.evaluation.settings import DEFAULT_SAMPLES, EvalSettings

_NOT_OPTIONS = {"restore"}  # built from the restore settings' own options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure restorations of ground-truth images against baselines (the evaluate flow)",
        description="From high-resolution ground truths under HR_SOURCE (a folder or "
        "s3://bucket/prefix), make LR inputs with the forward operator at each --factors (and "
        "each --degrade), restore them with the given preset and settings through the same "
        "pipeline as `pulse run`, and measure LR consistency, NIQE, BRISQUE, PSNR/SSIM against "
        "the ground truth, diversity and identity, beside nearest and bicubic upscaling. DEST "
        "gets eval.parquet, losses.parquet, summary.json, report.md, plots/ and sheets/.",
    )
    p.add_argument("source", metavar="HR_SOURCE", help="folder or s3:// prefix of ground truths")
    p.add_argument("--out", required=True, dest="dest", help="folder or s3:// prefix for results")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument(
        "--no-prefect", action="store_true", help="run in this process, without the flow"
    )
    g = p.add_argument_group("evaluation")
    hints = typing.get_type_hints(EvalSettings)
    for f in fields(EvalSettings):
        if f.name not in _NOT_OPTIONS:
            _add_field(g, f, hints[f.name], keep_default=True)
    add_settings_arguments(p)
    for action in p._actions:  # fewer samples than `pulse upsample`: 2 give a diversity number
        if action.dest == "samples":
            action.default = DEFAULT_SAMPLES
            action.help = f"HR samples per input (default: {DEFAULT_SAMPLES})"
    p.set_defaults(func=run_eval)


def eval_settings_from_args(args: argparse.Namespace) -> EvalSettings:
    values = {f.name: getattr(args, f.name) for f in fields(EvalSettings) if f.name != "restore"}
    return EvalSettings(restore=settings_from_args(args), **values)


def run_eval(args: argparse.Namespace) -> int:
    settings = eval_settings_from_args(args)  # checked before anything starts
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    if args.no_prefect:
        from pulse_core.evaluation.job import evaluate

        def progress(done: int, total: int, batch: object) -> None:
            say(f"  batch {done}/{total} done ({getattr(batch, 'inputs', 0)} LR inputs)")

        say(f"evaluating {args.source} -> {args.dest} (no Prefect)...")
        summary = evaluate(args.source, args.dest, settings, on_batch=progress)
    else:
        from pulse_cli.run import prepare_prefect_environment

        where = prepare_prefect_environment()
        from flows.evaluate import evaluate as evaluate_flow

        say(f"running the evaluate flow on {where}...")
        summary = evaluate_flow(args.source, args.dest, settings=settings)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
    else:
        print_summary(summary)
    return 1 if summary.failures else 0


def print_summary(summary: EvalSummary) -> None:
    print(markdown_table(summary.table))
    print(
        f"\n{summary.ground_truths} ground truth(s), {summary.inputs} LR input(s) restored in "
        f"{summary.seconds:.1f} s"
    )
    for name, why in summary.missing.items():
        print(f"not measured: {name}: {why}")
    for key, reason in summary.failures:
        print(f"failed {key}: {reason}", file=sys.stderr)
    root = summary.dest.rstrip("/")
    print(f"report: {root}/report.md; table: {root}/eval.parquet; sheets: {root}/sheets/")
