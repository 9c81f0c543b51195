"""Renderings of a run for Prefect artifacts: the results table and the markdown report.

The report is what an operator opens in the UI the morning after: counts, how well the inputs
were explained, previews they can see without leaving the browser, links to everything the run
wrote, where each batch ran, and every setting as used (never `None` for "the preset's").
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pulse_core.pipeline import InputOutcome, RunSummary

FAILURES_SHOWN = 200
BATCHES_SHOWN = 200
INPUTS_SHOWN = 100


@dataclass(frozen=True)
class Preview:
    """One contact sheet shown in the report: an image the browser can load, and a link."""

    input_key: str
    src: str  # presigned https URL (S3) or a small inline data: URI (local folders)
    link: str  # where the full sheet is: presigned URL, or the file's absolute path


@dataclass(frozen=True)
class Links:
    """Full locations of what the run wrote; `expires` set when they are presigned URLs."""

    dest: str
    samples: str
    losses: str
    index: str
    samples_url: str | None = None
    losses_url: str | None = None
    expires: datetime | None = None


def job_key(dest_url: str, deployment: str | None = None) -> str:
    """The artifact key prefix of a job: one per deployment, else one per destination.

    Every run used to write the same keys, so nightly and ad-hoc jobs shared one history in
    the UI. Keys allow lowercase letters, digits and dashes: a readable slug of the name, plus
    8 hex digits of its hash so two long names with the same ending never share a history.
    """
    name = deployment or dest_url.rstrip("/")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[-40:].strip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"restore-{slug}-{digest}" if slug else f"restore-{digest}"


def shorten(text: str, width: int) -> str:
    """`text` (a URL or key, its trailing slash dropped) in at most `width` characters: the end
    is kept, since the end of a path is what tells two runs or batches apart."""
    text = text.rstrip("/")
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _eps(s: RunSummary) -> float | None:
    """The eps the run searched with (its settings are the resolved ones)."""
    return (s.settings.get("search") or {}).get("eps")


def _error(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


def results_table(
    inputs: list[InputOutcome], eps: float | None = None, dest: str | None = None
) -> list[dict[str, Any]]:
    """One row per input the run kept detail for, failures first (the manifest has every row).

    `dest`: the destination's URL, to show outputs as full locations rather than relative keys.
    """
    ordered = sorted(inputs, key=lambda i: i.status == "ok")
    root = dest.rstrip("/") + "/" if dest else ""
    return [
        {
            "input": i.input_key,
            "status": i.status,
            "samples": i.sample_count,
            "converged": i.converged_count,
            "best L2": _error(i.best_mse),
            "eps": eps,
            "steps": i.steps,
            "best step": i.best_step,
            "attempts": i.attempts,
            "outputs": ", ".join(root + k for k in i.output_keys),
            "error": i.error or "",
        }
        for i in ordered
    ]


def _cell(value: object) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100.0 * part / whole:.0f}%)" if whole else "none"


def _loss_section(s: RunSummary) -> list[str]:
    loss, eps = s.loss, _eps(s)
    if loss is None or not loss.inputs:
        return []
    per_input = loss.steps / s.attempted if s.attempted else 0.0
    return [
        "## Loss summary",
        "",
        f"- inputs with a sample within eps ({eps}): **{_share(loss.converged_inputs, loss.inputs)}**",
        f"- samples within eps: {_share(loss.converged_samples, loss.samples)}",
        f"- best LR error per input: min {_error(loss.min_error)}, "
        f"median {_error(loss.median_error)}, max {_error(loss.max_error)}",
        f"- optimiser steps: {loss.steps} ({per_input:.0f} per input), "
        f"{loss.attempts} searches (samples and restarts)",
        "",
    ]


def _preview_section(previews: list[Preview], links: Links | None, shown_of: int) -> list[str]:
    if not previews:
        return []
    lines = ["## Previews", ""]
    if links and links.expires:
        lines += [
            f"Images and links are presigned URLs valid until {links.expires:%Y-%m-%d %H:%M} UTC.",
            "",
        ]
    elif previews:
        lines += [
            "Thumbnails of the contact sheets (LR | samples); the links are the full files.",
            "",
        ]
    for p in previews:
        lines += [
            f"**{p.input_key}** ([full sheet]({p.link}))",
            "",
            f"![{p.input_key}]({p.src})",
            "",
        ]
    if shown_of > len(previews):
        lines += [f"({len(previews)} of {shown_of} restored inputs shown.)", ""]
    return lines


def _links_section(links: Links | None) -> list[str]:
    if links is None:
        return []
    lines = ["## Outputs", "", f"- restored images: `{links.dest}/<input>/sample-<k>.png`"]
    for name, where, url in (
        ("run manifest (samples)", links.samples, links.samples_url),
        ("run manifest (losses)", links.losses, links.losses_url),
    ):
        lines.append(f"- {name}: `{where}`" + (f" ([download]({url}))" if url else ""))
    lines += [f"- dataset index: `{links.index}`", ""]
    return lines


def _settings_section(s: RunSummary) -> list[str]:
    settings = dict(s.settings)
    search = settings.pop("search", None) or {}
    if settings.get("device") == "auto" and s.devices:
        settings["device"] = f"auto (ran on {', '.join(sorted(s.devices))})"
    lines = ["## Settings as used", ""]
    lines += _table(["setting", "value"], [[k, f"`{v!r}`"] for k, v in settings.items()])
    if search:
        lines += ["Search options (the preset's values with any overrides applied):", ""]
        lines += _table(["search option", "value"], [[k, f"`{v!r}`"] for k, v in search.items()])
    return lines


def _batches_section(s: RunSummary) -> list[str]:
    if not s.batches:
        return []
    rows = [
        [
            b.batch_id,
            f"`{b.first_key}` .. `{b.last_key}`" if b.inputs > 1 else f"`{b.first_key}`",
            b.inputs,
            b.ok,
            b.failed,
            b.device,
            b.worker,
            f"{b.seconds:.1f}",
        ]
        for b in s.batches[:BATCHES_SHOWN]
    ]
    lines = ["## Batches", ""]
    lines += _table(["batch", "inputs", "n", "ok", "failed", "device", "worker", "seconds"], rows)
    if len(s.batches) > BATCHES_SHOWN:
        lines += [f"({BATCHES_SHOWN} of {len(s.batches)} batches shown.)", ""]
    return lines


def _inputs_section(s: RunSummary) -> list[str]:
    if not s.inputs:
        return []
    ordered = sorted(s.inputs, key=lambda i: i.status == "ok")[:INPUTS_SHOWN]
    rows = [
        [
            f"`{i.input_key}`",
            i.status,
            f"{i.converged_count}/{i.sample_count}",
            _error(i.best_mse),
            i.steps,
            i.best_step,
            i.attempts,
        ]
        for i in ordered
    ]
    lines = ["## Per input", ""]
    lines += _table(
        ["input", "status", "converged", "best LR error", "steps", "best step", "attempts"], rows
    )
    if s.attempted > len(ordered):
        lines += [f"({len(ordered)} of {s.attempted} inputs; the manifest has every one.)", ""]
    return lines


def report_markdown(
    s: RunSummary,
    previews: list[Preview] | None = None,
    links: Links | None = None,
) -> str:
    rate = s.attempted / s.seconds if s.seconds > 0 else 0.0
    verdict = f"{s.ok} ok, {s.failed} failed, {s.skipped} skipped"
    lines = [
        f"# Restore run {s.run_id}",
        "",
        f"**{verdict}**" + (" — see Failures below" if s.failed else ""),
        "",
        f"- source: `{s.source}`",
        f"- dest: `{s.dest}`",
        f"- model: `{s.model}` (sha256 `{s.model_checksum or 'unknown'}`)",
        "",
        "| found | already done | attempted | ok | failed | with a converged sample | samples written |",
        "|---|---|---|---|---|---|---|",
        f"| {s.found} | {s.skipped} | {s.attempted} | {s.ok} | {s.failed} | {s.converged_input_count} | {s.samples_written} |",
        "",
        f"Throughput: {rate:.2f} inputs/s ({s.seconds:.1f} s for the fan-out, {len(s.workers)} worker process(es)).",
        "",
    ]
    if s.failures:
        lines += ["## Failures", "", "| input | reason |", "|---|---|"]
        for key, reason in s.failures[:FAILURES_SHOWN]:
            lines.append(f"| `{key}` | {_cell(reason)} |")
        if len(s.failures) > FAILURES_SHOWN:
            lines.append(f"| ... | {len(s.failures) - FAILURES_SHOWN} more in the manifest |")
        lines.append("")
    lines += _loss_section(s)
    lines += _preview_section(previews or [], links, s.ok)
    lines += _links_section(links)
    lines += _inputs_section(s)
    lines += _batches_section(s)
    lines += _settings_section(s)
    return "\n".join(lines)
