"""The one pipeline: discover -> (decode -> restore -> render -> record) per batch -> finalise.

`pulse upsample`, the Prefect flow's tasks and notebooks all run these functions, so an input
gives the same PNGs, contact sheet and manifest rows whichever entry point restored it. No
Prefect here: the flow wraps `discover`, `process_batch` and `finalize_run` one-to-one.

Bad input never fails a batch: it becomes manifest rows with status "failed" and the reason.
Only transient storage errors propagate, so the caller may retry the whole batch: outputs and
parts are written under derived keys and a retry overwrites rather than duplicates.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from pulse_core.devices import pick_device
from pulse_core.errors import PulseError
from pulse_core.generators.base import Generator
from pulse_core.generators.loading import load_counts, load_generator
from pulse_core.imaging import LoadedImage, PreparedInput, load_image, prepare_input
from pulse_core.manifest import (
    INDEX_PREFIX,
    RUNS_PREFIX,
    InputRecord,
    RowContext,
    RunFiles,
    failed_rows,
    finalize_run,
    loss_rows,
    losses_table,
    read_index,
    sample_rows,
    samples_table,
    write_batch_manifests,
)
from pulse_core.render import OUTPUT_NAME, output_base, sample_keys, write_outputs
from pulse_core.restore import RestoreResult, restore_many
from pulse_core.settings import RestoreSettings
from pulse_core.storage import Storage, is_transient

# One list of input suffixes for every entry point (a GIF's first frame is used, and recorded).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
RESERVED_PREFIXES = (RUNS_PREFIX + "/", INDEX_PREFIX.split("/")[0] + "/")

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, steps, converged (N,))


# ----------------------------------------------------------------------------
# Discover


@dataclass
class Discovery:
    """What `discover` found: the pending input keys and what was skipped and why."""

    pending: list[str]
    total: int  # images found in source
    done: int  # skipped: outputs and manifest rows already in dest
    collisions: dict[str, str] = field(default_factory=dict)  # input key -> key it collides with


def discover(
    source: Storage,
    dest: Storage,
    samples: int,
    *,
    force: bool = False,
    limit: int | None = None,
) -> Discovery:
    """List images in source; skip those whose samples are all in dest's index and storage.

    An input counts as done when its index rows for samples 0..samples-1 are all "ok" and their
    PNGs exist. Failed or partial inputs are pending again, so a re-run resumes.
    """
    keys = _inputs_only(sorted(o.key for o in source.list(suffixes=IMAGE_SUFFIXES)), source, dest)
    collisions = find_collisions(keys)
    done: set[str] = set()
    if not force:
        index = read_index(dest)
        if index.num_rows:
            existing = {o.key for o in dest.list(suffixes=(".png",))}
            ok: dict[str, set[int]] = {}
            for row in index.select(
                ["input_key", "sample_index", "status", "output_key"]
            ).to_pylist():
                if row["status"] == "ok" and row["output_key"] in existing:
                    ok.setdefault(row["input_key"], set()).add(row["sample_index"])
            done = {k for k, idx in ok.items() if set(range(samples)) <= idx}
    pending = [k for k in keys if k not in done]
    if limit is not None:
        pending = pending[:limit]
    return Discovery(
        pending=pending, total=len(keys), done=len(done & set(keys)), collisions=collisions
    )


def find_collisions(keys: list[str]) -> dict[str, str]:
    """Inputs whose output folder another input already maps to (`a.png` and `a.jpg`)."""
    collisions: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        base = output_base(key)
        if base in seen:
            collisions[key] = seen[base]
        else:
            seen[base] = key
    return collisions


def _inputs_only(keys: list[str], source: Storage, dest: Storage) -> list[str]:
    """`keys` without dest's own outputs and manifests, when dest lies inside source.

    dest == source: manifests (`_runs/`, `_manifest/`) and the PNGs written in an input's output
    folder (`<stem>/sample-<k>.png`, `-lr.png`, `sheet.png` next to `<stem>.<ext>`) are not
    inputs. dest below source (`source/restored`): nothing under dest is an input. Without this,
    every re-run would take the previous run's outputs for new inputs.
    """
    src, dst = source.url.rstrip("/"), dest.url.rstrip("/")
    if dst.startswith(src + "/"):
        inside = dst[len(src) + 1 :] + "/"
        return [k for k in keys if not k.startswith(inside)]
    if dst != src:
        return keys
    keys = [k for k in keys if not k.startswith(RESERVED_PREFIXES)]
    bases = {output_base(k) for k in keys if not OUTPUT_NAME.match(k.rpartition("/")[2])}
    return [
        k
        for k in keys
        if not (OUTPUT_NAME.match(k.rpartition("/")[2]) and k.rpartition("/")[0] in bases)
    ]


# ----------------------------------------------------------------------------
# One batch: decode -> restore -> render -> record


@dataclass
class SampleOutcome:
    """One written sample, as the summary and the CLI show it (the manifest has the rest)."""

    index: int
    seed: int
    method: str  # restart | noise-resample
    converged: bool
    mse: float  # LR error at the best iterate
    output_key: str


@dataclass
class InputOutcome:
    """One input's result in a batch, for tables, reports and the CLI."""

    input_key: str
    status: str  # ok | failed
    error: str | None
    sample_count: int  # selected samples written
    converged_count: int  # of which converged (LR error <= eps)
    best_mse: float | None  # lowest LR error among its samples
    output_keys: list[str]
    conversions: list[str] = field(default_factory=list)  # how the input was normalised
    lr_size: int | None = None  # side of the LR image searched
    factor: int | None = None  # generator resolution / lr_size
    samples: list[SampleOutcome] = field(default_factory=list)


@dataclass
class BatchOutcome:
    batch_id: str
    inputs: list[InputOutcome]
    seconds: float
    worker: str  # "<host>:<pid>" of the process that ran it
    model_loads: int  # loads of the model in that process so far (1 = cached ever since)
    device: str
    generator_id: str
    generator_checksum: str

    @property
    def ok_count(self) -> int:
        return sum(i.status == "ok" for i in self.inputs)

    @property
    def failed_count(self) -> int:
        return sum(i.status != "ok" for i in self.inputs)


@dataclass
class DecodedInput:
    """An input read, normalised and fitted: ready for the search."""

    key: str
    loaded: LoadedImage
    prepared: PreparedInput

    def record(self) -> InputRecord:
        fit = self.prepared.fit
        return InputRecord(
            key=self.key,
            checksum=self.loaded.checksum,
            lr_size=self.prepared.lr_size,
            factor=self.prepared.factor,
            fit_policy=fit.policy,
            fit_box=fit.box if fit.changed else None,
            conversions=tuple(self.prepared.conversions),
        )


@dataclass
class FailedInput:
    key: str
    reason: str
    checksum: str | None = None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def decode_inputs(
    keys: list[str],
    source: Storage,
    settings: RestoreSettings,
    resolution: int,
    collisions: dict[str, str] | None = None,
) -> tuple[list[DecodedInput], list[FailedInput]]:
    """Read and normalise each input; what cannot be used becomes a FailedInput with a reason.

    Transient storage errors propagate (the batch is retried); every other error is the input's.
    """
    decoded: list[DecodedInput] = []
    failed: list[FailedInput] = []
    for key in keys:
        if collisions and key in collisions:
            reason = (
                f"output folder {output_base(key)!r} is also derived from {collisions[key]!r}; "
                "rename one of them"
            )
            failed.append(FailedInput(key, reason))
            continue
        try:
            data = source.read_bytes(key)
        except PulseError as exc:
            if is_transient(exc):
                raise
            failed.append(FailedInput(key, f"cannot read input: {exc}"))
            continue
        try:
            loaded = load_image(data, name=key, max_pixels=settings.max_pixels)
            prepared = prepare_input(loaded, resolution, settings.fit)
        except PulseError as exc:
            failed.append(FailedInput(key, str(exc), _checksum(data)))
            continue
        decoded.append(DecodedInput(key, loaded, prepared))
    return decoded, failed


def restore_decoded(
    decoded: list[DecodedInput],
    generator: Generator,
    settings: RestoreSettings,
    on_step: StepCallback | None = None,
) -> tuple[list[tuple[DecodedInput, RestoreResult]], list[FailedInput]]:
    """Search every decoded input in shared batches; a search error fails these inputs only."""
    if not decoded:
        return [], []
    try:
        results = restore_many(
            [d.prepared.tensor for d in decoded],
            generator,
            settings.samples,
            keys=[d.key for d in decoded],
            config=settings.config,
            seed=settings.seed,
            resample=settings.resample,
            search_batch=settings.search_batch,
            on_step=on_step,
        )
    except (PulseError, RuntimeError) as exc:  # e.g. CUDA out of memory: fail rows, go on
        return [], [FailedInput(d.key, f"search failed: {exc}", d.loaded.checksum) for d in decoded]
    for d, res in zip(decoded, results, strict=True):
        res.conversions = list(d.prepared.conversions)
    return list(zip(decoded, results, strict=True)), []


def process_batch(
    input_keys: list[str],
    source: Storage,
    dest: Storage,
    settings: RestoreSettings,
    *,
    run_id: str,
    batch_id: str,
    collisions: dict[str, str] | None = None,
    generator: Generator | None = None,
    on_step: StepCallback | None = None,
) -> BatchOutcome:
    """Restore one batch of inputs and write their PNGs and manifest parts to dest.

    `generator`: an already loaded one (the CLI); None loads `settings.model` on
    `settings.device` from the process cache (a worker loads each model once).
    """
    started = time.perf_counter()
    if generator is None:
        generator = load_generator(settings.model, pick_device(settings.device))
    device = str(_device_of(generator))
    ctx = RowContext(
        run_id=run_id,
        generator_id=generator.model_id,
        generator_checksum=generator.checksum,
        eps=settings.config.eps,
        device=device,
        created_at=datetime.now(UTC),
    )
    decoded, failed = decode_inputs(input_keys, source, settings, generator.resolution, collisions)
    restored, search_failed = restore_decoded(decoded, generator, settings, on_step)
    failed += search_failed

    rows: list[dict[str, Any]] = []
    losses: list[dict[str, Any]] = []
    outcomes: dict[str, InputOutcome] = {}
    for f in failed:
        rows += failed_rows(ctx, f.key, f.reason, settings.samples, f.checksum)
        outcomes[f.key] = InputOutcome(f.key, "failed", f.reason, 0, 0, None, [])
    for d, res in restored:
        outputs = write_outputs(dest, d.key, res, generator.model_id)
        rows += sample_rows(ctx, d.record(), res.attempts, outputs)
        losses += loss_rows(run_id, d.key, res.attempts)
        outcomes[d.key] = InputOutcome(
            input_key=d.key,
            status="ok",
            error=None,
            sample_count=len(res.samples),
            converged_count=res.converged_count,
            best_mse=min(s.mse for s in res.samples),
            output_keys=[outputs[s.index][0] for s in res.samples],
            conversions=list(res.conversions),
            lr_size=d.prepared.lr_size,
            factor=d.prepared.factor,
            samples=[
                SampleOutcome(s.index, s.seed, s.method, s.converged, s.mse, outputs[s.index][0])
                for s in res.samples
            ],
        )
    write_batch_manifests(dest, run_id, batch_id, samples_table(rows), losses_table(losses))
    return BatchOutcome(
        batch_id=batch_id,
        inputs=[outcomes[k] for k in input_keys],
        seconds=time.perf_counter() - started,
        worker=worker_id(),
        model_loads=load_counts().get(generator.model_id, 0),
        device=device,
        generator_id=generator.model_id,
        generator_checksum=generator.checksum,
    )


def _checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _device_of(generator: Generator) -> torch.device:
    for t in generator.parameters():
        return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------
# The run's summary: what `pulse upsample`, `pulse run` and the flow report


@dataclass
class RunSummary:
    """What a run did: the flow's return value, printed by `pulse run` and `pulse upsample`."""

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
    converged_input_count: int  # inputs with at least one converged sample
    samples_written: int
    seconds: float  # restore wall time (discovery and publishing excluded)
    samples_key: str = ""
    losses_key: str = ""
    workers: dict[str, int] = field(default_factory=dict)  # "<host>:<pid>" -> model loads there
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input key, reason)
    settings: dict[str, Any] = field(default_factory=dict)  # the effective RestoreSettings
    inputs: list[InputOutcome] = field(default_factory=list)

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
    files: RunFiles | None = None,
) -> RunSummary:
    inputs = [i for o in outcomes for i in o.inputs]
    workers: dict[str, int] = {}
    for o in outcomes:
        workers[o.worker] = max(workers.get(o.worker, 0), o.model_loads)
    first = outcomes[0] if outcomes else None
    root = dest.rstrip("/")
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
        converged_input_count=sum(i.converged_count > 0 for i in inputs),
        samples_written=sum(len(i.output_keys) for i in inputs),
        seconds=seconds,
        samples_key=f"{root}/{files.samples_key}" if files else "",
        losses_key=f"{root}/{files.losses_key}" if files else "",
        workers=workers,
        failures=[(i.input_key, i.error or "") for i in inputs if i.status != "ok"],
        settings=asdict(settings.resolved()),
        inputs=inputs,
    )


__all__ = [
    "IMAGE_SUFFIXES",
    "BatchOutcome",
    "DecodedInput",
    "Discovery",
    "FailedInput",
    "InputOutcome",
    "RunFiles",
    "RunSummary",
    "SampleOutcome",
    "decode_inputs",
    "discover",
    "finalize_run",
    "output_base",
    "process_batch",
    "restore_decoded",
    "sample_keys",
    "summarise",
]
