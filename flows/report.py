"""The run summary, and its renderings for Prefect artifacts and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pulse_core.batch import BatchOutcome, RestoreSettings

FAILURES_SHOWN = 200


@dataclass
class RunSummary:
    """What a run did: the flow's return value, printed by `pulse run`."""

    run_id: str
    source: str
    dest: str
    model: str
    model_checksum: str
    found: int  # images in source
    skipped: int  # already restored in dest
    attempted: int
    ok: int
    failed: int
    converged_inputs: int  # inputs with at least one converged sample
    samples_written: int
    seconds: float  # fan-out wall time (discovery and publishing excluded)
    samples_key: str = ""
    losses_key: str = ""
    workers: dict[str, int] = field(default_factory=dict)  # "<host>:<pid>" -> model loads there
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input key, reason)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(
    run_id: str,
    source: str,
    dest: str,
    settings: RestoreSettings,
    found: int,
    skipped: int,
    outcomes: list[BatchOutcome],
    seconds: float,
) -> RunSummary:
    inputs = [i for o in outcomes for i in o.inputs]
    workers: dict[str, int] = {}
    for o in outcomes:
        workers[o.worker] = max(workers.get(o.worker, 0), o.model_loads)
    first = outcomes[0] if outcomes else None
    return RunSummary(
        run_id=run_id,
        source=source,
        dest=dest,
        model=first.generator_id if first else settings.model,
        model_checksum=first.generator_checksum if first else "",
        found=found,
        skipped=skipped,
        attempted=len(inputs),
        ok=sum(i.status == "ok" for i in inputs),
        failed=sum(i.status != "ok" for i in inputs),
        converged_inputs=sum(i.converged > 0 for i in inputs),
        samples_written=sum(len(i.output_keys) for i in inputs),
        seconds=seconds,
        workers=workers,
        failures=[(i.input_key, i.error or "") for i in inputs if i.status != "ok"],
        settings=asdict(settings),
    )


def results_table(outcomes: list[BatchOutcome]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        for i in o.inputs:
            rows.append(
                {
                    "input": i.input_key,
                    "status": i.status,
                    "samples": len(i.output_keys),
                    "converged": i.converged,
                    "best L2": None if i.best_l2 is None else float(f"{i.best_l2:.3g}"),
                    "outputs": ", ".join(i.output_keys),
                    "error": i.error or "",
                }
            )
    return rows


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
        f"| {s.found} | {s.skipped} | {s.attempted} | {s.ok} | {s.failed} | {s.converged_inputs} | {s.samples_written} |",
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
