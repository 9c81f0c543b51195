"""Task: list the source and decide what is left to do (idempotent, resumable)."""

from __future__ import annotations

from prefect import get_run_logger, task

from pulse_core.pipeline import Discovery, discover
from pulse_core.storage import Storage


@task(name="discover", tags=["io"])
def discover_inputs(
    source: Storage, dest: Storage, samples: int, force: bool, limit: int | None
) -> Discovery:
    """Check both storages first (clear errors before any work), then list what is pending."""
    source.check()
    dest.check(create=True)
    found = discover(source, dest, samples, force=force, limit=limit)
    logger = get_run_logger()
    logger.info(
        "found %d image(s) in %s: %d already restored in %s, %d to do",
        found.total,
        source.url,
        found.done,
        dest.url,
        len(found.pending),
    )
    for key, other in found.collisions.items():
        logger.warning("%s and %s map to the same output folder; %s will fail", key, other, key)
    return found
