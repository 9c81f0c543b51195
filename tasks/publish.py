"""Tasks: merge a run's manifests and publish its table and report as Prefect artifacts."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pulse_core.manifest import RunFiles, finalize_run
from pulse_core.storage import Storage

TABLE_ROWS = 1000  # an artifact is for reading; the manifest has every row


@task(name="finalize-manifests", tags=["io"], retries=2, retry_delay_seconds=5)
def finalize_manifests(dest: Storage, run_id: str) -> RunFiles:
    return finalize_run(dest, run_id)


@task(name="publish-artifacts", tags=["io"])
def publish_artifacts(table: list[dict], report: str, run_key: str) -> None:
    shown = table[:TABLE_ROWS]
    note = (
        ""
        if len(table) <= TABLE_ROWS
        else f" (first {TABLE_ROWS} of {len(table)}; see the manifest)"
    )
    create_table_artifact(shown, key=f"{run_key}-results", description=f"Per-input results{note}")
    create_markdown_artifact(report, key=f"{run_key}-report", description="Run report")
