"""`pulse upsample`: restore a set of local image files into a folder, with a report.

Every input is attempted; a bad input is recorded with its reason and the others go on. The
exit status is non-zero when any input failed, and the failures are listed with their reasons.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pulse_cli.progress import ProgressBar
from pulse_core.devices import pick_device
from pulse_core.downscale import OPERATORS
from pulse_core.errors import PulseError
from pulse_core.generators.loading import load_generator
from pulse_core.imaging import (
    FIT_POLICIES,
    PreparedInput,
    contact_sheet,
    load_image,
    prepare_input,
    save_png,
)
from pulse_core.restore import RestoreResult, restore_many
from pulse_core.schedules import OPTIMIZERS, SCHEDULES
from pulse_core.search import DEFAULT_PRESET, NOISE_MODES, PRESETS, SearchConfig, preset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs a search (upsample, run)."""
    g = p.add_argument_group("search")
    g.add_argument(
        "--model",
        default="demo",
        help="catalogue name or path to a model file/folder (default: demo)",
    )
    g.add_argument("--samples", type=int, default=4, help="HR samples per input (default: 4)")
    g.add_argument(
        "--resample",
        type=int,
        default=0,
        help="how many of the samples come from noise resampling of the best restart (StyleGAN only; default 0)",
    )
    g.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=sorted(PRESETS),
        help="base settings: robust (default: intermediate-layer search, early stop, restarts; "
        "docs/evaluation.md), fast (the paper + early stop) or reference (the paper, exactly)",
    )
    g.add_argument("--steps", type=int, help="optimiser steps (reference: 100, robust: 150)")
    g.add_argument("--eps", type=float, help="success threshold on the LR MSE (preset: 2e-3)")
    g.add_argument("--loss", help="loss, e.g. '100*L2+0.05*GEOCROSS' (preset)")
    g.add_argument("--operator", choices=OPERATORS, help="forward operator (preset: bicubic)")
    g.add_argument("--learning-rate", type=float, help="base learning rate (preset: 0.4)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimiser (preset: adam)")
    g.add_argument(
        "--schedule", choices=SCHEDULES, help="learning-rate schedule (preset: linear1cycledrop)"
    )
    g.add_argument(
        "--noise-mode", choices=NOISE_MODES, help="StyleGAN noise inputs (preset: trainable)"
    )
    g.add_argument(
        "--intermediate-layers",
        type=_layer_list,
        help="intermediate-layer search: 'auto', split points like '16x16,32x32', or 'none' for "
        "plain PULSE (preset)",
    )
    g.add_argument(
        "--intermediate-radius",
        type=float,
        help="ball radius of each offset, relative to its feature map's norm (preset)",
    )
    g.add_argument(
        "--restart-budget",
        type=float,
        help="steps an input may use over all restarts, in rounds of samples x steps; 1 = no "
        "extra restarts (preset)",
    )
    g.add_argument(
        "--early-stop",
        action="store_true",
        default=None,
        help="freeze each sample once it converged; stop when all have (preset)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; each (input, sample) derives its own (default: 0)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="search rows (inputs x samples) per forward pass (default: 16)",
    )
    g.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)"
    )
    g.add_argument(
        "--fit",
        default="center-crop",
        choices=FIT_POLICIES,
        help="how non-square inputs are made square (default: center-crop)",
    )


def _layer_list(text: str) -> tuple[str, ...]:
    text = text.strip()
    if text.lower() in ("none", "off", ""):
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    base = preset(args.preset)
    changes = {
        "steps": args.steps,
        "eps": args.eps,
        "loss": args.loss,
        "operator": args.operator,
        "learning_rate": args.learning_rate,
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "noise_mode": args.noise_mode,
        "early_stop": args.early_stop,
        "intermediate_layers": args.intermediate_layers,
        "intermediate_radius": args.intermediate_radius,
        "restart_budget": args.restart_budget,
    }
    return base.with_(**{k: v for k, v in changes.items() if v is not None})


def collect_inputs(paths: list[str]) -> list[Path]:
    """Files as given, folders scanned recursively for image suffixes, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            found.append(p)  # a missing or odd file becomes a recorded failure, not a crash
    return found


@dataclass
class InputReport:
    input: str
    status: str  # ok | failed
    error: str | None = None
    lr_size: int | None = None
    factor: int | None = None
    conversions: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    converged: int = 0
    best_mse: float | None = None
    folder: str | None = None
    seconds: float = 0.0


def _out_names(inputs: list[Path]) -> list[str]:
    """One output folder per input, named by its stem; clashes get -2, -3..."""
    used: dict[str, int] = {}
    names = []
    for p in inputs:
        stem = p.stem or "input"
        n = used.get(stem, 0) + 1
        used[stem] = n
        names.append(stem if n == 1 else f"{stem}-{n}")
    return names


def run_upsample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    config = config_from_args(args)
    device = pick_device(args.device)
    inputs = collect_inputs(args.inputs)
    if not inputs:
        print("pulse upsample: no input images found", file=sys.stderr)
        return 2
    say = (lambda *a: print(*a, file=sys.stderr)) if not args.json else (lambda *a: None)
    say(f"loading model {args.model} on {device}...")
    generator = load_generator(args.model, device, allow_download=True)
    say(f"model: {generator.describe()}")
    say(
        f"{len(inputs)} input(s), {args.samples} sample(s) each, {config.steps} steps, eps {config.eps:g}"
    )

    names = _out_names(inputs)
    reports: list[InputReport] = []
    prepared: list[tuple[int, PreparedInput]] = []
    for i, path in enumerate(inputs):
        rep = InputReport(input=str(path), status="ok")
        reports.append(rep)
        try:
            loaded = load_image(path)
            prep = prepare_input(loaded, generator.resolution, args.fit)
        except (PulseError, OSError) as exc:
            rep.status, rep.error = "failed", str(exc)
            continue
        rep.lr_size, rep.factor, rep.conversions = prep.lr_size, prep.factor, prep.conversions
        prepared.append((i, prep))

    restarts = args.samples - args.resample
    per_group = max(1, args.batch_size // max(restarts, 1))
    groups = [prepared[k : k + per_group] for k in range(0, len(prepared), per_group)]
    for gi, group in enumerate(groups):
        bar = ProgressBar(
            _planned_steps([p.lr_size for _, p in group], args, config),
            f"batch {gi + 1}/{len(groups)}",
            enabled=not args.json and not args.quiet,
        )

        def on_step(step: int, steps: int, conv: torch.Tensor, bar: ProgressBar = bar) -> None:
            bar.advance(f"converged {int(conv.sum())}/{conv.numel()}")

        started = time.perf_counter()
        try:
            results = restore_many(
                [p.tensor for _, p in group],
                generator,
                args.samples,
                keys=[names[i] for i, _ in group],
                config=config,
                seed=args.seed,
                resample=args.resample,
                batch_size=args.batch_size,
                on_step=on_step,
            )
        except (PulseError, RuntimeError) as exc:  # e.g. out of memory: fail the group, go on
            bar.close()
            for i, _ in group:
                reports[i].status, reports[i].error = "failed", f"search failed: {exc}"
            continue
        bar.close()
        elapsed = (time.perf_counter() - started) / len(group)
        for (i, _), res in zip(group, results, strict=True):
            _write_outputs(out / names[i], res, reports[i], generator.model_id)
            reports[i].seconds = elapsed

    _write_summary(out, reports, args, config, generator)
    failed = [r for r in reports if r.status != "ok"]
    if args.json:
        print(json.dumps({"out": str(out), "inputs": [asdict(r) for r in reports]}, indent=2))
    else:
        _print_table(reports)
        print(
            f"\nresults in {out}/ (one folder per input: sample-K.png, sample-K-lr.png, sheet.png; summary.json)"
        )
    if failed:
        print(f"\n{len(failed)} of {len(reports)} input(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.input}: {r.error}", file=sys.stderr)
        return 1
    return 0


def _planned_steps(sizes: list[int], args: argparse.Namespace, config: SearchConfig) -> int:
    """Optimiser steps restore_many will run for a group: one search per size and batch."""
    total = 0
    for size in set(sizes):
        n = sizes.count(size)
        restarts = n * (args.samples - args.resample)
        total += -(-restarts // args.batch_size) * config.steps
        if args.resample:
            total += -(-(n * args.resample) // args.batch_size) * 30
    return total


def _write_outputs(folder: Path, res: RestoreResult, rep: InputReport, model_id: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    labels = [f"input {res.lr.shape[-1]}px"]
    for s in res.samples:
        meta = {"pulse:seed": str(s.seed), "pulse:model": model_id, "pulse:mse": f"{s.mse:.6g}"}
        save_png(s.hr, folder / f"sample-{s.index}.png", metadata=meta)
        save_png(s.lr.clamp(0, 1), folder / f"sample-{s.index}-lr.png")
        labels.append(f"#{s.index} {'ok' if s.converged else 'NOT converged'} mse={s.mse:.2g}")
        rep.samples.append(
            {
                "index": s.index,
                "seed": s.seed,
                "method": s.method,
                "parent": s.parent,
                "converged": s.converged,
                "mse": s.mse,
                "losses": s.terms,
                "best_step": s.best_step,
                "steps_run": s.steps_run,
                "file": str(folder / f"sample-{s.index}.png"),
            }
        )
    sheet = contact_sheet(
        res.lr, [s.hr for s in res.samples], [s.lr.clamp(0, 1) for s in res.samples], labels=labels
    )
    sheet.save(folder / "sheet.png")
    rep.converged = res.converged
    rep.best_mse = min(s.mse for s in res.samples)
    rep.folder = str(folder)


def _write_summary(
    out: Path, reports: list[InputReport], args: argparse.Namespace, config: SearchConfig, generator
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": generator.model_id,
        "model_sha256": generator.checksum,
        "config": asdict(config),
        "samples": args.samples,
        "seed": args.seed,
        "inputs": [asdict(r) for r in reports],
    }
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")


def _print_table(reports: list[InputReport]) -> None:
    rows = [("input", "LR", "x", "converged", "best MSE", "s/input", "status")]
    for r in reports:
        rows.append(
            (
                Path(r.input).name,
                f"{r.lr_size}px" if r.lr_size else "-",
                str(r.factor or "-"),
                f"{r.converged}/{len(r.samples)}" if r.samples else "-",
                f"{r.best_mse:.2e}" if r.best_mse is not None else "-",
                f"{r.seconds:.1f}" if r.seconds else "-",
                r.status,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
