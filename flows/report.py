"""Renderings of a run for Prefect artifacts: the results table and the markdown report."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pulse_core.pipeline import InputOutcome, RunSummary

FAILURES_SHOWN = 200


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


def results_table(inputs: list[InputOutcome], eps: float | None = None) -> list[dict[str, Any]]:
    """One row per input the run kept detail for, failures first (the manifest has every row)."""
    ordered = sorted(inputs, key=lambda i: i.status == "ok")
    return [
        {
            "input": i.input_key,
            "status": i.status,
            "samples": i.sample_count,
            "converged": i.converged_count,
            "best L2": None if i.best_mse is None else float(f"{i.best_mse:.3g}"),
            "eps": eps,
            "outputs": ", ".join(i.output_keys),
            "error": i.error or "",
        }
        for i in ordered
    ]


def report_markdown(s: RunSummary) -> str:
    rate = s.attempted / s.seconds if s.seconds > 0 else 0.0
    lines = [
        f"# Restore run {s.run_id}",
        "",
        f"- source: `{s.source}`",
        f"- dest: `{s.dest}`",
        f"- model: `{s.model}` (sha256 `{s.model_checksum}`)",
        "",
        "| found | already done | attempted | ok | failed | with a converged sample | samples written |",
        "|---|---|---|---|---|---|---|",
        f"| {s.found} | {s.skipped} | {s.attempted} | {s.ok} | {s.failed} | {s.converged_input_count} | {s.samples_written} |",
        "",
        f"Throughput: {rate:.2f} inputs/s ({s.seconds:.1f} s for the fan-out, {len(s.workers)} worker process(es)).",
        "",
        f"Manifests: `{s.samples_key}`, `{s.losses_key}`; dataset index under `_manifest/samples/`.",
        "",
    ]
    if s.failures:
        lines += ["## Failures", "", "| input | reason |", "|---|---|"]
        for key, reason in s.failures[:FAILURES_SHOWN]:
            lines.append(f"| `{key}` | {reason.replace('|', '/')} |")
        if len(s.failures) > FAILURES_SHOWN:
            lines.append(f"| ... | {len(s.failures) - FAILURES_SHOWN} more in the manifest |")
        lines.append("")
    lines += ["## Parameters", "", "```", *[f"{k} = {v!r}" for k, v in s.settings.items()], "```"]
    return "\n".join(lines)
