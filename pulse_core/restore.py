"""Several restorations of low-resolution images: the API for notebooks, the CLI and the flow.

Samples of one input come from new random starts ("restart": high-level variation) and from
noise resampling ("noise-resample": keep the best restart's latent, draw new noise maps and
refine for a few steps: fine-level variation such as hair and skin texture). Each sample records
how it was made, its seed and, for resamples, its parent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from pulse_core.errors import ConfigError, InputError
from pulse_core.generators.base import Generator
from pulse_core.imaging import image_from_pil
from pulse_core.memory import is_out_of_memory, plan_batch, release_cached
from pulse_core.search import (
    Execution,
    InitialState,
    SearchConfig,
    SearchResult,
    draw_noise,
    initial_state,
    search,
)
from pulse_core.seeds import sample_seed

RESTART = "restart"
NOISE_RESAMPLE = "noise-resample"


@dataclass
class SampleResult:
    """One HR output of one input, from its best iterate."""

    index: int  # sample index k within the input
    seed: int  # the seed its start (or its new noise) was drawn from
    method: str  # "restart" | "noise-resample"
    parent: int | None  # for noise-resample: the sample whose latent it kept
    hr: torch.Tensor  # (3, R, R) in [0, 1], clamped
    lr: torch.Tensor  # (3, h, w) downscale of `hr`'s iterate (the LR check)
    converged: bool  # mse <= eps
    mse: float  # LR mean squared error at the best iterate (unclamped)
    terms: dict[str, float]  # each loss term and TOTAL at the best iterate
    best_step: int
    steps_run: int
    history: dict[str, list[float]]  # per step: lr, MSE, each term, TOTAL
    latent: torch.Tensor  # best latent, for reproduction and resampling
    noise: list[torch.Tensor]  # best noise maps (each (1, h, w))
    seconds: float  # share of the batch's wall time
    attempt: int = 0  # which restart of this input produced it (its seed derives from it)
    selected: bool = True  # among the `samples` returned; False: a recorded extra attempt
    intermediate_layers: tuple[str, ...] = ()  # split points offset (intermediate mode)
    intermediate_radius: float | None = None  # their ball radius, relative to feature norms
    search_batch: int = 1  # rows of the search that produced it (after any OOM halving)
    precision: str = "fp32"  # the synthesis' autocast precision
    checkpoint: bool = False  # activation checkpointing was used


@dataclass
class RestoreResult:
    """All samples of one input."""

    key: str  # the input's name (file key or caller's label)
    lr: torch.Tensor  # (3, h, w) the input as searched
    factor: int
    samples: list[SampleResult] = field(default_factory=list)  # the selected ones, by index
    extra_attempts: list[SampleResult] = field(default_factory=list)  # restarts not selected
    conversions: list[str] = field(default_factory=list)  # how the input was normalised

    @property
    def converged_count(self) -> int:
        """How many of the selected samples converged."""
        return sum(s.converged for s in self.samples)

    @property
    def attempts(self) -> list[SampleResult]:
        """Every search run for this input, selected or not."""
        return [*self.samples, *self.extra_attempts]

    @property
    def steps_spent(self) -> int:
        return sum(s.steps_run for s in self.attempts)

    def best(self) -> SampleResult:
        """The converged sample with the lowest total, else the one with the lowest MSE."""
        return min(self.samples, key=_quality)


def _quality(s: SampleResult) -> tuple[bool, float]:
    """Sort key: converged first (by total loss), then the rest by LR error."""
    return (not s.converged, s.terms["TOTAL"] if s.converged else s.mse)


@dataclass(frozen=True)
class SampleJob:
    """One row of a batched search: which input, which sample, from which start."""

    input_index: int
    sample_index: int
    seed: int
    method: str = RESTART
    parent: int | None = None


def as_tensor_image(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """(3, h, w) float in [0, 1] from a tensor (C, h, w) or a PIL image (normalised as a file)."""
    if isinstance(image, Image.Image):
        return image_from_pil(image).tensor
    if not isinstance(image, torch.Tensor):
        raise InputError(f"expected a torch.Tensor or PIL.Image, got {type(image).__name__}")
    t = image.detach().float().cpu()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise InputError(f"expected an image tensor (3, h, w), got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if not torch.isfinite(t).all():
        raise InputError("image has NaN or infinite values")
    if t.min() < -0.5 or t.max() > 1.5:
        # Small overshoots are normal after a bicubic downscale; 0..255 data is a caller's slip.
        raise InputError(
            f"image values span [{float(t.min()):g}, {float(t.max()):g}]; expected [0, 1] "
            "(divide 8-bit data by 255)"
        )
    return t


def restore(
    image: torch.Tensor | Image.Image,
    generator: Generator,
    samples: int = 4,
    *,
    config: SearchConfig | None = None,
    seed: int = 0,
    key: str = "input",
    resample: int = 0,
    resample_steps: int = 30,
    search_batch: int | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    execution: Execution | None = None,
) -> RestoreResult:
    """Restore one in-memory LR image (square, its side dividing the generator resolution).

    A PIL image is normalised exactly as a file would be (EXIF orientation, 16-bit, CMYK,
    palette, alpha, grey); what was done is in the result's `conversions`.
    """
    conversions: list[str] = []
    if isinstance(image, Image.Image):
        loaded = image_from_pil(image, name=key)
        image, conversions = loaded.tensor, loaded.conversions
    result = restore_many(
        [as_tensor_image(image)],
        generator,
        samples,
        keys=[key],
        config=config,
        seed=seed,
        resample=resample,
        resample_steps=resample_steps,
        search_batch=search_batch,
        on_step=on_step,
        execution=execution,
    )[0]
    result.conversions = conversions
    return result


def restore_many(
    images: Sequence[torch.Tensor],
    generator: Generator,
    samples: int = 4,
    *,
    keys: Sequence[str],
    config: SearchConfig | None = None,
    seed: int = 0,
    resample: int = 0,
    resample_steps: int = 30,
    search_batch: int | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    execution: Execution | None = None,
) -> list[RestoreResult]:
    """Restore several LR images, batching (images x samples) rows through one search.

    `samples` per input, of which `resample` are noise resamples of the best restart (needs a
    generator with noise inputs). Rows are grouped by LR size and cut into `search_batch` rows;
    None = auto: as many as fit the device's free memory (`memory.plan_batch`). A search that
    runs out of memory anyway is retried with half the rows (then a quarter, ... down to 1),
    and the rest of the group keeps the smaller batch. `execution`: precision, checkpointing,
    compile (`Execution()` by default).

    The config's `restart_budget` (in rounds of `restarts x steps`; 1 = no extra restarts)
    bounds the optimiser steps an input may spend: while an input has fewer converged restarts
    than it needs and its budget allows another `config.steps`, it gets new restarts (new
    seeds). The best restarts are returned as the
    samples, converged first; the others are kept in `extra_attempts`, so nothing is lost.
    """
    config = config or SearchConfig.reference()
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if not 0 <= resample < samples:
        raise ConfigError(
            f"resample must be between 0 and samples - 1 ({samples - 1}), got {resample}"
        )
    if resample and not generator.noise_shapes:
        raise ConfigError(
            f"{generator.model_id} has no noise inputs, so samples can only come from restarts; "
            "use resample=0"
        )
    if len(keys) != len(images):
        raise ConfigError("one key per image is required")
    results = []
    for key, img in zip(keys, images, strict=True):
        img = as_tensor_image(img)
        h, w = img.shape[1:]
        if h != w:
            raise InputError(
                f"{key}: LR image is {w}x{h}; make it square first (imaging.prepare_input)"
            )
        if generator.resolution % h or generator.resolution // h < 2:
            raise InputError(
                f"{key}: LR size {h} must divide the generator resolution {generator.resolution} "
                "by a factor of at least 2"
            )
        results.append(RestoreResult(key=key, lr=img, factor=generator.resolution // h))

    restarts = samples - resample
    step_budget = int(config.restart_budget * restarts * config.steps)  # >= one round
    attempts: list[list[SampleResult]] = [[] for _ in images]
    jobs = [
        SampleJob(i, k, sample_seed(seed, keys[i], k))
        for i in range(len(images))
        for k in range(restarts)
    ]
    rounds = 0
    while jobs:
        _run_jobs(
            jobs,
            attempts,
            results,
            generator,
            _round_config(config, rounds),
            search_batch,
            on_step,
            None,
            execution,
        )
        rounds += 1
        jobs = []
        for i, tried in enumerate(attempts):
            need = restarts - sum(a.converged for a in tried)
            if need <= 0:
                continue
            left = step_budget - sum(a.steps_run for a in tried)
            more = min(need, left // config.steps)
            jobs += [
                SampleJob(i, a, sample_seed(seed, keys[i], a))
                for a in range(len(tried), len(tried) + more)
            ]
    for res, tried in zip(results, attempts, strict=True):
        ranked = sorted(tried, key=_quality)
        for k, s in enumerate(ranked[:restarts]):
            s.index = k
        for j, s in enumerate(ranked[restarts:]):
            s.index, s.selected = samples + j, False
        res.samples = ranked[:restarts]
        res.extra_attempts = ranked[restarts:]

    if resample:
        refine = config.with_(
            steps=resample_steps, schedule="fixed", learning_rate=config.learning_rate / 10
        )
        jobs = []
        parents: dict[int, SampleResult] = {}
        for i, res in enumerate(results):
            parent = res.best()
            parents[i] = parent
            jobs += [
                SampleJob(
                    i, k, sample_seed(seed, keys[i], k, "noise"), NOISE_RESAMPLE, parent.index
                )
                for k in range(restarts, samples)
            ]

        def init_of(job: SampleJob) -> tuple[torch.Tensor, list[torch.Tensor]]:
            rng = torch.Generator().manual_seed(job.seed)
            return parents[job.input_index].latent[None], draw_noise(generator, refine, rng)

        extra: list[list[SampleResult]] = [[] for _ in images]
        _run_jobs(
            jobs, extra, results, generator, refine, search_batch, on_step, init_of, execution
        )
        for res, made in zip(results, extra, strict=True):
            res.samples += made
    for res in results:
        res.samples.sort(key=lambda s: s.index)
    return results


def _round_config(config: SearchConfig, rounds: int) -> SearchConfig:
    """The config of restart round `rounds` (0 = the first): the intermediate ball widened.

    Inputs still unconverged after a round are the ones the generator's manifold plus a small
    ball cannot reach; a wider ball in the next round reaches more of them (docs/evaluation.md,
    "Factor 2"). Each sample records the radius it was searched with.
    """
    growth = config.restart_radius_growth
    if rounds == 0 or growth == 1 or not config.intermediate_layers:
        return config
    return config.with_(intermediate_radius=config.intermediate_radius * growth**rounds)


def _run_jobs(
    jobs: list[SampleJob],
    into: list[list[SampleResult]],
    results: list[RestoreResult],
    generator: Generator,
    config: SearchConfig,
    search_batch: int | None,
    on_step: Callable[[int, int, torch.Tensor], None] | None,
    init_of: Callable[[SampleJob], tuple[torch.Tensor, list[torch.Tensor]]] | None,
    execution: Execution | None = None,
) -> None:
    execution = execution or Execution()
    by_size: dict[int, list[SampleJob]] = {}
    for job in jobs:
        by_size.setdefault(results[job.input_index].lr.shape[-1], []).append(job)
    for group in by_size.values():
        plan = plan_batch(
            generator,
            len(group),
            batch=search_batch,
            checkpoint=execution.checkpoint,
            precision=execution.precision,
        )
        # The plan's checkpoint choice is the search's (not re-planned per chunk).
        run = replace(execution, checkpoint="on" if plan.checkpoint else "off")
        size, start = plan.batch, 0
        while start < len(group):
            chunk = group[start : start + size]
            try:
                out, seconds = _search_chunk(
                    chunk, results, generator, config, on_step, init_of, run
                )
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                # Rows are independent (per-row losses, elementwise Adam), so the same rows at
                # half the batch are the same search problem; a single row that still does not
                # fit gets one last try with checkpointing (equal results, less memory).
                if len(chunk) > 1:
                    size = max(1, len(chunk) // 2)
                elif run.checkpoint == "off" and generator.supports_checkpoint:
                    run = replace(run, checkpoint="on")
                else:
                    raise
                release_cached(generator.device)
                continue
            for row, job in enumerate(chunk):
                sample = _sample_from(out, row, job, seconds / len(chunk), config)
                sample.search_batch = len(chunk)
                into[job.input_index].append(sample)
            start += len(chunk)


def _search_chunk(
    chunk: list[SampleJob],
    results: list[RestoreResult],
    generator: Generator,
    config: SearchConfig,
    on_step: Callable[[int, int, torch.Tensor], None] | None,
    init_of: Callable[[SampleJob], tuple[torch.Tensor, list[torch.Tensor]]] | None,
    execution: Execution,
) -> tuple[SearchResult, float]:
    """One search over the chunk's rows; returns it with its wall time."""
    targets = torch.stack([results[j.input_index].lr for j in chunk])
    if init_of is None:
        init = initial_state(generator, [j.seed for j in chunk], config)
    else:
        parts = [init_of(j) for j in chunk]
        init = InitialState(
            torch.cat([p[0] for p in parts]),
            [torch.cat([p[1][i] for p in parts]) for i in range(len(generator.noise_shapes))],
        )
    t0 = time.perf_counter()
    out = search(generator, targets, init, config, on_step=on_step, execution=execution)
    return out, time.perf_counter() - t0


def _sample_from(
    out: SearchResult, row: int, job: SampleJob, seconds: float, config: SearchConfig
) -> SampleResult:
    steps = int(out.row_steps[row]) if out.row_steps.numel() else out.steps_run
    return SampleResult(
        index=job.sample_index,
        seed=job.seed,
        method=job.method,
        parent=job.parent,
        hr=out.hr[row].clamp(0, 1),
        lr=out.lr[row],
        converged=bool(out.converged[row]),
        mse=float(out.mse[row]),
        terms={k: float(v[row]) for k, v in out.terms.items()},
        best_step=int(out.best_step[row]),
        steps_run=steps,
        history={k: v[:steps, row].tolist() for k, v in out.history.items()},
        latent=out.latent[row],
        noise=[m[row] for m in out.noise],
        seconds=seconds,
        attempt=job.sample_index,
        intermediate_layers=tuple(config.intermediate_layers),
        intermediate_radius=config.intermediate_radius if config.intermediate_layers else None,
        precision=out.precision,
        checkpoint=out.checkpointed,
    )
