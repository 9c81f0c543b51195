"""Batch restoration between storages: the library side of the pipeline (no Prefect here).

`discover` lists what a source holds and what is still to do; `restore_items` restores one batch
and writes its PNGs and manifest parts; `finalize_run` merges a run's parts and reconciles the
dataset index. Prefect tasks wrap these one-to-one, so the same code runs in a notebook, in a
thread pool or on a Dask GPU worker.

Keys: an input `scans/1950s/a.png` (relative to source) gives `scans/1950s/a/sample-<k>.png`,
`.../sample-<k>-lr.png` and `.../sheet.png` (input | samples | their downscales) in dest: derived from the input key and the sample index only, so a re-run
writes to the same place. Bad input never fails a batch: it becomes a manifest row with status
"failed" and the reason. Only transient storage errors propagate (so the task can be retried).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from pulse_core.devices import pick_device
from pulse_core.errors import PulseError
from pulse_core.generators.loading import load_counts, load_generator
from pulse_core.imaging import (
    DEFAULT_MAX_PIXELS,
    contact_sheet,
    encode_png,
    load_image,
    prepare_input,
)
from pulse_core.manifest import (
    INDEX_PREFIX,
    RUNS_PREFIX,
    append_to_index,
    losses_table,
    read_index,
    read_manifest,
    reconcile_index,
    run_manifest_key,
    samples_table,
    write_parquet,
)
from pulse_core.restore import RestoreResult, restore_many
from pulse_core.search import DEFAULT_PRESET, SearchConfig, preset
from pulse_core.storage import Storage, TransientStorageError, is_transient

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RESERVED_PREFIXES = (RUNS_PREFIX + "/", INDEX_PREFIX.split("/")[0] + "/")
# Names of what restore_items writes in an input's output folder (see `sample_keys`).
OUTPUT_NAME = re.compile(r"^(?:sample-\d+(?:-lr)?|sheet)\.png$")


@dataclass(frozen=True)
class RestoreSettings:
    """What to restore with: the model, the search and the input handling, for a whole run."""

    model: str = "demo"  # catalogue name or path visible to every worker
    samples: int = 4  # HR samples per input
    resample: int = 0  # of which by noise resampling (StyleGAN only)
    preset: str = DEFAULT_PRESET  # base SearchConfig: robust (the product default)
    steps: int | None = None  # overrides of the preset; None = keep
    eps: float | None = None
    loss: str | None = None
    operator: str | None = None
    early_stop: bool | None = None
    learning_rate: float | None = None
    optimizer: str | None = None
    schedule: str | None = None
    noise_mode: str | None = None
    intermediate_layers: tuple[str, ...] | None = None  # () = plain PULSE; ("auto",) = auto
    intermediate_radius: float | None = None
    restart_budget: float | None = None
    seed: int = 0  # base seed; each (input, sample) derives its own
    fit: str = "center-crop"  # non-square policy
    device: str = "auto"
    search_batch: int = 32  # rows (inputs x samples) per forward pass
    max_pixels: int = DEFAULT_MAX_PIXELS

    def search_config(self) -> SearchConfig:
        changes = {
            "steps": self.steps,
            "eps": self.eps,
            "loss": self.loss,
            "operator": self.operator,
            "early_stop": self.early_stop,
            "learning_rate": self.learning_rate,
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "noise_mode": self.noise_mode,
            "intermediate_layers": None
            if self.intermediate_layers is None
            else tuple(self.intermediate_layers),
            "intermediate_radius": self.intermediate_radius,
            "restart_budget": self.restart_budget,
        }
        return preset(self.preset).with_(**{k: v for k, v in changes.items() if v is not None})


def output_base(input_key: str) -> str:
    """`a/b/photo.jpg` -> `a/b/photo`: the folder of that input's samples in dest."""
    head, _, name = input_key.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}/{stem}" if head else stem


def sample_keys(input_key: str, index: int) -> tuple[str, str]:
    base = output_base(input_key)
    return f"{base}/sample-{index}.png", f"{base}/sample-{index}-lr.png"


# ----------------------------------------------------------------------------


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
    collisions: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        base = output_base(key)
        if base in seen:
            collisions[key] = seen[base]
        else:
            seen[base] = key
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
        pending=pending,
        total=len(keys),
        done=len(done & set(keys)),
        collisions=collisions,
    )


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


@dataclass
class InputOutcome:
    """One input's result in a batch, for tables and reports."""

    input_key: str
    status: str  # ok | failed
    error: str | None
    samples: int
    converged: int
    best_l2: float | None
    output_keys: list[str]


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
    def ok(self) -> int:
        return sum(i.status == "ok" for i in self.inputs)

    @property
    def failed(self) -> int:
        return sum(i.status != "ok" for i in self.inputs)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def restore_items(
    input_keys: list[str],
    source: Storage,
    dest: Storage,
    settings: RestoreSettings,
    *,
    run_id: str,
    batch_id: str,
    collisions: dict[str, str] | None = None,
) -> BatchOutcome:
    """Restore one batch of inputs and write their PNGs and manifest parts to dest.

    Raises only for transient storage errors (the caller may retry the whole batch: outputs and
    parts are written under derived keys, so a retry overwrites rather than duplicates).
    """
    started = time.perf_counter()
    device = pick_device(settings.device)
    generator = load_generator(settings.model, device)
    config = settings.search_config()
    now = datetime.now(UTC)
    base_row = {
        "run_id": run_id,
        "generator_id": generator.model_id,
        "generator_checksum": generator.checksum,
        "eps": config.eps,
        "device": str(device),
        "created_at": now,
    }
    rows: list[dict] = []
    loss_rows: list[dict] = []
    outcomes: dict[str, InputOutcome] = {}
    prepared = []

    def fail(key: str, reason: str, checksum: str | None = None, extra: dict | None = None) -> None:
        for k in range(settings.samples):
            rows.append(
                {
                    **base_row,
                    **(extra or {}),
                    "input_key": key,
                    "input_checksum": checksum,
                    "seed": 0,
                    "sample_index": k,
                    "method": "restart",
                    "converged": False,
                    "status": "failed",
                    "error": reason,
                }
            )
        outcomes[key] = InputOutcome(key, "failed", reason, settings.samples, 0, None, [])

    for key in input_keys:
        if collisions and key in collisions:
            fail(
                key,
                f"output folder {output_base(key)!r} is also derived from {collisions[key]!r}; rename one of them",
            )
            continue
        try:
            data = source.read_bytes(key)
        except PulseError as exc:
            if is_transient(exc):
                raise
            fail(key, f"cannot read input: {exc}")
            continue
        try:
            loaded = load_image(data, name=key, max_pixels=settings.max_pixels)
        except PulseError as exc:
            fail(key, str(exc), hashlib.sha256(data).hexdigest())
            continue
        try:
            prep = prepare_input(loaded, generator.resolution, settings.fit)
        except PulseError as exc:
            fail(key, str(exc), loaded.checksum)
            continue
        prepared.append((key, loaded, prep))

    results: list[RestoreResult] = []
    if prepared:
        try:
            results = restore_many(
                [p.tensor for _, _, p in prepared],
                generator,
                settings.samples,
                keys=[k for k, _, _ in prepared],
                config=config,
                seed=settings.seed,
                resample=settings.resample,
                batch_size=settings.search_batch,
            )
        except (PulseError, RuntimeError) as exc:  # e.g. CUDA out of memory: fail rows, go on
            for key, loaded, _ in prepared:
                fail(key, f"search failed: {exc}", loaded.checksum)
            prepared = []

    for (key, loaded, prep), res in zip(prepared, results, strict=True):
        fit_box = None if not prep.fit.changed else prep.fit.box
        common = {
            **base_row,
            "input_key": key,
            "input_checksum": loaded.checksum,
            "lr_width": prep.lr_size,
            "lr_height": prep.lr_size,
            "factor": prep.factor,
            "fit_policy": prep.fit.policy,
            "fit_box": fit_box,
            "conversions": prep.conversions,
        }
        out_keys = []
        for s in res.attempts:  # the selected samples, then extra restarts (rows only, no PNG)
            hr_key: str | None = None
            lr_key: str | None = None
            if s.selected:
                hr_key, lr_key = sample_keys(key, s.index)
                meta = {
                    "pulse:input": key,
                    "pulse:seed": str(s.seed),
                    "pulse:model": generator.model_id,
                }
                _write(dest, hr_key, encode_png(s.hr, metadata=meta))
                _write(dest, lr_key, encode_png(s.lr.clamp(0, 1)))
                out_keys.append(hr_key)
            rows.append(
                {
                    **common,
                    "seed": s.seed,
                    "sample_index": s.index,
                    "method": s.method,
                    "parent_sample": s.parent,
                    "attempt": s.attempt,
                    "selected": s.selected,
                    "intermediate_layers": list(s.intermediate_layers),
                    "intermediate_radius": s.intermediate_radius,
                    "steps_run": s.steps_run,
                    "best_step": s.best_step,
                    "final_l2": s.mse,
                    "final_geocross": s.terms.get("GEOCROSS"),
                    "final_total": s.terms.get("TOTAL"),
                    "converged": s.converged,
                    "output_key": hr_key,
                    "lr_check_key": lr_key,
                    "seconds": s.seconds,
                    "status": "ok",
                    "error": None,
                }
            )
            h = s.history
            for step in range(s.steps_run):
                loss_rows.append(
                    {
                        "run_id": run_id,
                        "input_key": key,
                        "sample_index": s.index,
                        "step": step,
                        "lr": h["lr"][step],
                        "l2": h["MSE"][step],
                        "l1": h["L1"][step] if "L1" in h else None,
                        "geocross": h["GEOCROSS"][step] if "GEOCROSS" in h else None,
                        "total": h["TOTAL"][step],
                    }
                )
        sheet = contact_sheet(
            res.lr,
            [s.hr for s in res.samples],
            [s.lr.clamp(0, 1) for s in res.samples],
            labels=[f"input {prep.lr_size}px"]
            + [f"#{s.index} {'ok' if s.converged else 'not converged'}" for s in res.samples],
        )
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        _write(dest, f"{output_base(key)}/sheet.png", buf.getvalue())
        best = min(s.mse for s in res.samples)
        outcomes[key] = InputOutcome(
            key, "ok", None, len(res.samples), res.converged, best, out_keys
        )

    samples = samples_table(rows)
    write_parquet(dest, _part_key(run_id, "samples", batch_id), samples)
    write_parquet(dest, _part_key(run_id, "losses", batch_id), losses_table(loss_rows))
    append_to_index(dest, samples, f"{run_id}-{batch_id}", reconcile=False)
    return BatchOutcome(
        batch_id=batch_id,
        inputs=[outcomes[k] for k in input_keys],
        seconds=time.perf_counter() - started,
        worker=worker_id(),
        model_loads=load_counts().get(generator.model_id, 0),
        device=str(device),
        generator_id=generator.model_id,
        generator_checksum=generator.checksum,
    )


def _write(dest: Storage, key: str, data: bytes) -> None:
    dest.write_bytes(key, data, content_type="image/png")


def _part_key(run_id: str, kind: str, batch_id: str) -> str:
    return f"{RUNS_PREFIX}/{run_id}/parts/{kind}-{batch_id}.parquet"


# ----------------------------------------------------------------------------


@dataclass
class RunFiles:
    samples_key: str
    losses_key: str
    samples_rows: int
    losses_rows: int


def finalize_run(dest: Storage, run_id: str) -> RunFiles:
    """Merge the run's batch parts into `samples.parquet` / `losses.parquet`; reconcile the index.

    Parts are deleted only after both merged files are written, so a crash here loses nothing
    and running it again finishes the job.
    """
    prefix = f"{RUNS_PREFIX}/{run_id}/parts/"
    parts = sorted(o.key for o in dest.list(prefix=prefix, suffixes=(".parquet",)))
    merged: dict[str, pa.Table] = {}
    for kind, make in (("samples", samples_table), ("losses", losses_table)):
        tables = [read_manifest(dest, k) for k in parts if k[len(prefix) :].startswith(f"{kind}-")]
        table = pa.concat_tables(tables) if tables else make([])
        write_parquet(dest, run_manifest_key(run_id, kind), table)
        merged[kind] = table
    for key in parts:
        dest.delete(key)
    reconcile_index(dest)
    return RunFiles(
        samples_key=run_manifest_key(run_id, "samples"),
        losses_key=run_manifest_key(run_id, "losses"),
        samples_rows=merged["samples"].num_rows,
        losses_rows=merged["losses"].num_rows,
    )


__all__ = [
    "BatchOutcome",
    "Discovery",
    "InputOutcome",
    "RestoreSettings",
    "RunFiles",
    "TransientStorageError",
    "discover",
    "finalize_run",
    "output_base",
    "restore_items",
    "sample_keys",
]
