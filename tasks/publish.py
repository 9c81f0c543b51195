"""Tasks: merge a run's manifests and publish its table and report as Prefect artifacts."""

from __future__ import annotations

import base64
import io
import logging
from datetime import UTC, datetime, timedelta

from PIL import Image
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError

from flows.report import Links, Preview
from pulse_core.errors import PulseError
from pulse_core.manifest import INDEX_PREFIX, RunFiles, finalize_run
from pulse_core.pipeline import InputOutcome
from pulse_core.render import sheet_key
from pulse_core.storage import Storage

TABLE_ROWS = 1000  # an artifact is for reading; the manifest has every row
PREVIEWS = 8  # contact sheets shown in the report
LINK_EXPIRY_S = 7 * 24 * 3600  # presigned links last a week (SigV4's longest)
THUMBNAIL_PX = (480, 160)  # inline previews of local runs: small, so the report stays small


@task(name="finalize-manifests", tags=["io"], retries=2, retry_delay_seconds=5)
def finalize_manifests(dest: Storage, run_id: str) -> RunFiles:
    return finalize_run(dest, run_id)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger; this module's when called outside a run (scripts, tests)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _thumbnail(data: bytes) -> str:
    """A small JPEG of a contact sheet as a data: URI (Prefect's markdown renders them)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail(THUMBNAIL_PX, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@task(name="make-previews", tags=["io"])
def make_previews(dest: Storage, inputs: list[InputOutcome]) -> list[Preview]:
    """Contact sheets of the first restored inputs, as images the browser can load.

    A preview that cannot be made (an object deleted meanwhile, no credentials to sign with)
    is left out with a warning: the report matters more than any one picture.
    """
    previews: list[Preview] = []
    for item in inputs:
        if len(previews) == PREVIEWS:
            break
        if item.status != "ok" or not item.samples:
            continue
        key = sheet_key(item.input_key, item.samples[0].face)
        try:
            url = dest.share_url(key, LINK_EXPIRY_S)
            if url is not None:
                previews.append(Preview(item.input_key, url, url))
            else:
                src = _thumbnail(dest.read_bytes(key))
                previews.append(Preview(item.input_key, src, dest.local_path(key).as_uri()))
        except (PulseError, OSError) as exc:
            _logger().warning("no preview of %s: %s", item.input_key, exc)
    return previews


def make_links(dest: Storage, files: RunFiles) -> Links:
    """Full locations of the run's outputs and manifests; presigned download links on S3."""
    expires: datetime | None = None
    urls: list[str | None] = []
    for key in (files.samples_key, files.losses_key):
        try:
            urls.append(dest.share_url(key, LINK_EXPIRY_S))
        except PulseError:
            urls.append(None)
    if any(urls):
        expires = datetime.now(UTC) + timedelta(seconds=LINK_EXPIRY_S)
    return Links(
        dest=dest.url.rstrip("/"),
        samples=dest.uri(files.samples_key),
        losses=dest.uri(files.losses_key),
        index=f"{dest.url.rstrip('/')}/{INDEX_PREFIX}/",
        samples_url=urls[0],
        losses_url=urls[1],
        expires=expires,
    )


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
