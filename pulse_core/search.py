"""The PULSE optimisation loop (pulse-reference.md sections 2-7), batched over samples.

One call optimises N independent samples at once: each row of the batch has its own target LR
image, its own latent and noise maps. The loss is a sum of per-row terms and Adam is elementwise,
so rows do not influence each other; batching only shares the generator's forward pass.

Fixes over the reference (section 9): the best iterate and `converged` are tracked per sample, the
HR image and its LR preview come from the same iterate, a sample that never reaches eps is
returned flagged with its losses, and nothing is tied to a device.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch

from pulse_core.downscale import OPERATORS, Operator, downscale
from pulse_core.errors import ConfigError
from pulse_core.generators.base import Generator
from pulse_core.layers import FeatureOffsets
from pulse_core.losses import DEFAULT_LOSS, compute_loss, mse_per_sample, parse_loss
from pulse_core.memory import (
    CHECKPOINT_MODES,
    PRECISIONS,
    CheckpointMode,
    Precision,
    autocast,
    check_precision,
    plan_batch,
)
from pulse_core.schedules import (
    OPTIMIZERS,
    Optimizer,
    Schedule,
    check_schedule,
    lr_factor,
    make_optimizer,
)

NoiseMode = Literal["zero", "fixed", "trainable"]
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)


def option(default: Any, description: str) -> Any:
    """A settings field with its user-facing description.

    The description is the one text for a field everywhere: argparse help (`pulse_cli.options`),
    the Prefect deployment form (pydantic reads dataclass field metadata into the JSON schema)
    and the docs, so adding an option is a change in one place.
    """
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class SearchConfig:
    """Everything that defines one search; `SearchConfig()` is the paper's `reference` preset.

    Checked when built (`__post_init__`), so a `SearchConfig` that exists is valid: nothing
    downstream validates again.
    """

    steps: int = option(100, "optimiser steps per search")
    learning_rate: float = option(0.4, "base learning rate, scaled by the schedule")
    optimizer: Optimizer = option("adam", "optimiser (sgdm = SGD with momentum 0.9)")
    schedule: Schedule = option("linear1cycledrop", "learning-rate schedule over the steps")
    loss: str = option(DEFAULT_LOSS, "loss grammar: weighted terms, e.g. '100*L2+0.05*GEOCROSS'")
    eps: float = option(2e-3, "success threshold on the LR mean squared error ([0, 1] images)")
    operator: Operator = option("bicubic", "forward operator DS that made the LR image")
    noise_mode: NoiseMode = option("trainable", "StyleGAN noise inputs: zero, fixed or trainable")
    trainable_noise_layers: int = option(
        5, "with noise_mode=trainable: how many of the first noise maps are optimised"
    )
    zeroed_noise_layers: tuple[int, ...] | None = option(
        None, "noise maps forced to zero (indices, negative from the end); empty = the last one"
    )
    tile_latent: bool = option(False, "one latent broadcast to every style input")
    early_stop: bool = option(False, "freeze each sample once it converged; stop when all have")
    intermediate_layers: tuple[str, ...] = option(
        (), "intermediate-layer search: split points to offset ('auto', or names such as 16x16)"
    )
    intermediate_radius: float = option(
        0.2, "ball radius of each intermediate offset, relative to its feature map's norm"
    )
    intermediate_start: float = option(
        1 / 3, "fraction of the steps before the first intermediate layer switches on"
    )
    restart_budget: float = option(
        1.0,
        "steps an input may spend over all its restarts, in rounds of samples x steps: "
        "1 = one round (no extra restarts); 2 = one more round for inputs not yet converged",
    )
    restart_radius_growth: float = option(
        1.0,
        "each restart round after the first multiplies intermediate_radius by this "
        "(1 = the same ball every round)",
    )

    def __post_init__(self) -> None:
        # Lists from JSON (the Prefect form, pydantic) become tuples: the config stays hashable.
        for name in ("intermediate_layers", "zeroed_noise_layers"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check()

    @classmethod
    def reference(cls) -> SearchConfig:
        """The paper's settings, exactly (and no early stop)."""
        return cls()

    def _check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.eps <= 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimiser {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
            )
        if self.operator not in OPERATORS:
            raise ConfigError(
                f"unknown forward operator {self.operator!r}; choose one of: {', '.join(OPERATORS)}"
            )
        if self.noise_mode not in NOISE_MODES:
            raise ConfigError(
                f"unknown noise mode {self.noise_mode!r}; choose one of: {', '.join(NOISE_MODES)}"
            )
        if self.trainable_noise_layers < 0:
            raise ConfigError("trainable_noise_layers must be >= 0")
        if self.restart_budget < 1:
            raise ConfigError(f"restart_budget must be >= 1 (rounds), got {self.restart_budget}")
        if self.intermediate_radius <= 0:
            raise ConfigError(f"intermediate_radius must be > 0, got {self.intermediate_radius}")
        if self.restart_radius_growth < 1:
            raise ConfigError(
                f"restart_radius_growth must be >= 1, got {self.restart_radius_growth}"
            )
        if not 0 <= self.intermediate_start < 1:
            raise ConfigError(
                f"intermediate_start must be in [0, 1), got {self.intermediate_start}"
            )
        check_schedule(self.schedule)
        parse_loss(self.loss)

    def with_(self, **changes: object) -> SearchConfig:
        """A copy with some fields changed (checked like any new config)."""
        return replace(self, **changes)  # type: ignore[arg-type]


PresetName = Literal["robust", "fast", "reference"]
DEFAULT_PRESET: PresetName = "robust"  # what `pulse upsample`, `pulse run` and the flow use

PRESETS: dict[str, Callable[[], SearchConfig]] = {
    "reference": SearchConfig.reference,
    # The reference numerics plus per-sample early stop: converged samples stop, less time.
    "fast": lambda: SearchConfig(early_stop=True),
    # The product default (docs/evaluation.md): intermediate-layer search on the split points at
    # 1/8 and 1/4 of the output with a 5% ball, early stop, and one more round of restarts with
    # a 1.5x wider ball for inputs that still have unconverged samples (the factor-2 rule: at
    # 32x32 it brought the held-out faces from 96% to 100% within eps at the same realism).
    "robust": lambda: SearchConfig(
        steps=150,
        early_stop=True,
        intermediate_layers=("auto",),
        intermediate_radius=0.05,
        restart_budget=2.0,
        restart_radius_growth=1.5,
    ),
}
assert set(PRESETS) == set(get_args(PresetName)), "one preset per PresetName choice"


def preset(name: str) -> SearchConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """How a search runs on its device; what it finds is the same up to float rounding.

    Kept apart from `SearchConfig` (what to search for): `Execution()` is today's exact path
    (fp32, no compile; checkpointing only where the plain path cannot fit, where it gives
    equal results). `RestoreSettings` carries the user's choice (`execution()`).
    """

    precision: Precision = "fp32"  # the synthesis under autocast; losses, sphere, Adam in fp32
    checkpoint: CheckpointMode = "auto"  # activation checkpointing per synthesis block
    compile: bool = False  # torch.compile the synthesis (cached per generator and mode)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}"
            )
        if self.checkpoint not in CHECKPOINT_MODES:
            raise ConfigError(
                f"unknown checkpoint mode {self.checkpoint!r}; choose one of: "
                f"{', '.join(CHECKPOINT_MODES)}"
            )


FP16_LOSS_SCALE = 2.0**12  # fp16 only: the loss is scaled before backward so small gradients
# of the activations do not flush to zero in float16, and the input gradients unscaled after

_COMPILED: weakref.WeakKeyDictionary[Generator, dict[bool, Callable[..., torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)
_COMPILED_LOCK = threading.Lock()


def _synthesis_fn(generator: Generator, checkpoint: bool, compile: bool) -> Callable[..., Any]:
    """The function a step calls: plain or checkpointed synthesis, compiled if asked.

    Compiled functions are cached here per generator (a weak mapping: nothing is set on the
    shared generator, and the cached function is the unbound method, so the cache does not keep
    the generator alive) so a process compiles each (generator, checkpoint) once.
    """
    fn = generator.synthesize_checkpointed if checkpoint else generator.synthesize
    if not compile:
        return fn
    with _COMPILED_LOCK:
        per_gen = _COMPILED.setdefault(generator, {})
        if checkpoint not in per_gen:
            unbound = fn.__func__  # type: ignore[attr-defined]
            per_gen[checkpoint] = torch.compile(unbound, dynamic=False)
        compiled = per_gen[checkpoint]
    return lambda w, noise, edit=None: compiled(generator, w, noise, edit)


@dataclass
class InitialState:
    """Where a search starts: latents (N, L or 1, D) and one (N, 1, h, w) tensor per noise input."""

    latent: torch.Tensor
    noise: list[torch.Tensor]

    def to(self, device: torch.device) -> InitialState:
        return InitialState(self.latent.to(device), [n.to(device) for n in self.noise])

    def select(self, index: torch.Tensor | list[int]) -> InitialState:
        idx = torch.as_tensor(index, dtype=torch.long, device=self.latent.device)
        return InitialState(self.latent[idx], [n[idx] for n in self.noise])


def zeroed_layers(generator: Generator, config: SearchConfig) -> set[int]:
    n = len(generator.noise_shapes)
    if n == 0:
        return set()
    if config.noise_mode == "zero":
        return set(range(n))
    layers = config.zeroed_noise_layers
    if layers is None:
        return {n - 1}
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ConfigError(
            f"zeroed noise layers {bad} out of range: the generator has {n} noise inputs"
        )
    return {i % n for i in layers}


def trainable_layers(generator: Generator, config: SearchConfig) -> list[int]:
    if config.noise_mode != "trainable":
        return []
    zero = zeroed_layers(generator, config)
    k = min(config.trainable_noise_layers, len(generator.noise_shapes))
    return [i for i in range(k) if i not in zero]


def draw_noise(
    generator: Generator, config: SearchConfig, rng: torch.Generator
) -> list[torch.Tensor]:
    """One sample's noise maps (1, 1, h, w): N(0, 1), zeroed where the config says so.

    Every map is drawn even when zeroed, so a seed gives the same maps whatever the mode.
    """
    zero = zeroed_layers(generator, config)
    maps = []
    for i, (h, w) in enumerate(generator.noise_shapes):
        m = torch.randn(1, 1, h, w, generator=rng)
        maps.append(torch.zeros_like(m) if i in zero else m)
    return maps


def initial_state(generator: Generator, seeds: list[int], config: SearchConfig) -> InitialState:
    """Draw each sample's start from its own seed on the CPU: identical on every device."""
    rows = 1 if config.tile_latent else generator.num_latents
    latents, noises = [], []
    for seed in seeds:
        rng = torch.Generator().manual_seed(int(seed))
        latents.append(torch.randn(1, rows, generator.latent_dim, generator=rng))
        noises.append(draw_noise(generator, config, rng))
    noise = [torch.cat([n[i] for n in noises]) for i in range(len(generator.noise_shapes))]
    return InitialState(torch.cat(latents), noise)


_MALLOC_TUNED: bool | None = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory for reuse instead of handing it back to the kernel.

    Every search step allocates and frees the same large activations (64 MB each per sample at
    1024 px). glibc serves blocks over 32 MB with fresh mmap()s and unmaps them on free, so each
    step page-faults through its whole working set again: measured on a 2-core VM, 1M faults
    and ~55% of the CPU time of a 1024 px StyleGAN v1 step (0.43M with the fast path). With
    mmap off and trimming off the blocks are reused after the first two steps; the cost is
    memory: the process keeps its high-water mark, which fragmentation raises (1024 px peak RSS
    1.55 -> 1.98 GB at batch 1, 4.1 -> 6.3 GB at batch 4). Process-wide and done once, on the
    first CPU search; set PULSE_MALLOC_TUNING=0 to leave the allocator alone. Returns whether
    the tuning is in effect (False off glibc/Linux).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = False
        if sys.platform.startswith("linux") and os.environ.get("PULSE_MALLOC_TUNING", "1") != "0":
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
                _MALLOC_TUNED = bool(
                    libc.mallopt(m_mmap_max, 0)
                    and libc.mallopt(m_trim_threshold, -1)  # -1: never trim
                )
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
                pass
    return _MALLOC_TUNED


def sphere_norm(p: torch.Tensor) -> torch.Tensor:
    """Norm over every dim after the first two (which are batch-like), kept for broadcasting."""
    return (p.pow(2).sum(dim=tuple(range(2, p.ndim)), keepdim=True) + 1e-9).sqrt()


# ----------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Per-sample outcome of one batched search (all tensors on the CPU, first dim N)."""

    hr: torch.Tensor  # (N, 3, R, R) best iterate's image in [0, 1] (not clamped)
    lr: torch.Tensor  # (N, 3, h, w) its downscale: the LR check, from the same iterate
    latent: torch.Tensor  # (N, L or 1, D) best iterate's latent (on the sphere)
    noise: list[torch.Tensor]  # best iterate's noise maps
    best_step: torch.Tensor  # (N,) step of the best iterate
    mse: torch.Tensor  # (N,) unclamped LR mean squared error at the best iterate
    terms: dict[str, torch.Tensor]  # (N,) each loss term and TOTAL at the best iterate
    converged: torch.Tensor  # (N,) bool: best MSE <= eps
    steps_run: int  # steps the batch ran (fewer than config.steps after an early stop)
    row_steps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # (N,) steps each sample was optimised (a frozen, converged sample stops counting)
    history: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (steps_run, N)
    seconds: float = 0.0
    precision: str = "fp32"  # the synthesis' autocast precision
    checkpointed: bool = False  # activation checkpointing was used


StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, steps, converged (N,))


def search(
    generator: Generator,
    targets: torch.Tensor,
    init: InitialState,
    config: SearchConfig,
    *,
    on_step: StepCallback | None = None,
    execution: Execution | None = None,
) -> SearchResult:
    """Optimise N samples whose downscales must match `targets` (N, 3, h, w) in [0, 1].

    Runs on the generator's device. The best iterate of a sample is the lowest total loss among
    its iterates within eps, or the lowest total loss overall if it never got within eps.
    `execution`: precision, checkpointing and compile (default `Execution()`: fp32, plain unless
    the step does not fit in free memory).
    """
    started = time.perf_counter()
    spec = parse_loss(config.loss)
    device = generator.device
    execution = execution or Execution()
    check_precision(execution.precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    n, _, h, w = targets.shape
    res = generator.resolution
    if res % h or res % w or res // h != res // w:
        raise ConfigError(f"LR size {h}x{w} does not divide the generator resolution {res}")
    factor = res // h
    rows = 1 if config.tile_latent else generator.num_latents
    if init.latent.shape != (n, rows, generator.latent_dim):
        raise ConfigError(
            f"initial latent has shape {tuple(init.latent.shape)}, expected {(n, rows, generator.latent_dim)}"
        )
    if len(init.noise) != len(generator.noise_shapes):
        raise ConfigError(
            f"expected {len(generator.noise_shapes)} initial noise maps, got {len(init.noise)}"
        )

    target = targets.to(device=device, dtype=torch.float32)
    latent = init.latent.to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    train = set(trainable_layers(generator, config))
    noise = [
        m.to(device=device, dtype=torch.float32).clone().requires_grad_(i in train)
        for i, m in enumerate(init.noise)
    ]
    params = [latent] + [noise[i] for i in sorted(train)]
    with torch.no_grad():
        radii = [sphere_norm(p) for p in params]
    opt = make_optimizer(config.optimizer, params, config.learning_rate)
    # This call's intermediate offsets: handed to every forward as `edit`, never set on the
    # generator, which other threads share (architecture.md: shared and read-only).
    offsets = (
        FeatureOffsets(
            generator,
            config.intermediate_layers,
            config.intermediate_radius,
            config.steps,
            config.intermediate_start,
        )
        if config.intermediate_layers
        else None
    )
    deltas: list[torch.Tensor] = []  # intermediate offsets, joined as their layers switch on
    checkpointed = execution.checkpoint == "on" and generator.supports_checkpoint
    if execution.checkpoint == "auto" and generator.supports_checkpoint:
        plan = plan_batch(generator, n, batch=n, precision=execution.precision)
        checkpointed = plan.checkpoint
    synthesis = _synthesis_fn(generator, checkpointed, execution.compile)
    loss_scale = FP16_LOSS_SCALE if execution.precision == "fp16" else 1.0

    best_total = torch.full((n,), float("inf"), device=device)
    best_conv = torch.zeros(n, dtype=torch.bool, device=device)
    best_step = torch.zeros(n, dtype=torch.long, device=device)
    best_mse = torch.full((n,), float("inf"), device=device)
    best_terms: dict[str, torch.Tensor] = {}
    best_hr = torch.zeros(n, 3, res, res, device=device)
    best_lr = torch.zeros_like(target)
    best_latent = latent.detach().clone()
    best_noise = [m.detach().clone() for m in noise]
    history: dict[str, list[torch.Tensor]] = {"lr": [], "MSE": [], "TOTAL": []}
    history.update({name: [] for name in spec.names})
    # Per-sample early stop: a converged row is frozen (its tensors pinned to the converged
    # iterate after every optimiser step) and stops counting steps; the batch ends when all are.
    frozen = torch.zeros(n, dtype=torch.bool, device=device)
    pinned: dict[int, torch.Tensor] = {}  # id(param) -> values its frozen rows are pinned to
    row_steps = torch.zeros(n, dtype=torch.long, device=device)

    steps_run = 0
    for step in range(config.steps):
        if offsets is not None:
            offsets.switch_on(step)
        lr_now = config.learning_rate * lr_factor(config.schedule, step, config.steps)
        for group in opt.param_groups:
            group["lr"] = lr_now
        opt.zero_grad(set_to_none=True)
        lat = latent.expand(-1, generator.num_latents, -1) if config.tile_latent else latent
        w_in = generator.prior(lat)
        with autocast(device, execution.precision):
            raw = synthesis(w_in, noise, edit=offsets)
        image = (raw.float() + 1.0) / 2.0
        lr_image = downscale(image, factor, config.operator)
        values = compute_loss(spec, lr_image, target, w_in, config.eps)
        if loss_scale == 1.0:
            values.total.sum().backward()
        else:
            (values.total.sum() * loss_scale).backward()
            with torch.no_grad():
                for p in [*params, *deltas]:
                    if p.grad is not None:
                        p.grad.div_(loss_scale).nan_to_num_(0.0, 0.0, 0.0)
        if offsets is not None:
            for d in offsets.new_params():
                if not any(d is known for known in deltas):
                    deltas.append(d)
                    opt.add_param_group({"params": [d], "lr": lr_now})

        with torch.no_grad():
            row_steps += (~frozen).long()
            mse = mse_per_sample(lr_image, target)
            conv = mse <= config.eps
            better = (conv & ~best_conv) | ((conv == best_conv) & (values.total < best_total))
            better &= ~frozen
            best_total = torch.where(better, values.total, best_total)
            best_conv = best_conv | (conv & ~frozen)
            best_step = torch.where(better, torch.full_like(best_step, step), best_step)
            best_mse = torch.where(better, mse, best_mse)
            for name, v in values.terms.items():
                prev = best_terms.get(name, torch.zeros_like(v))
                best_terms[name] = torch.where(better, v, prev)
            best_terms["TOTAL"] = best_total
            sel = better.view(-1, 1, 1, 1)
            best_hr = torch.where(sel, image, best_hr)
            best_lr = torch.where(sel, lr_image, best_lr)
            best_latent = torch.where(better.view(-1, 1, 1), latent, best_latent)
            best_noise = [torch.where(sel, m, b) for m, b in zip(noise, best_noise, strict=True)]
            history["lr"].append(torch.full((n,), lr_now))
            history["MSE"].append(mse)
            history["TOTAL"].append(values.total.detach())
            for name, v in values.terms.items():
                history[name].append(v.detach())
            if config.early_stop:
                newly = conv & ~frozen
                frozen |= conv
                for p in [*params, *deltas]:
                    pin = pinned.setdefault(id(p), p.detach().clone())
                    pin[newly] = p[newly]

        opt.step()
        with torch.no_grad():
            for p, r in zip(params, radii, strict=True):
                p.div_(sphere_norm(p)).mul_(r)
            if offsets is not None:
                offsets.project()
            if config.early_stop and bool(frozen.any()):
                for p in [*params, *deltas]:
                    pin = pinned.setdefault(id(p), p.detach().clone())
                    p[frozen] = pin[frozen]
        steps_run = step + 1
        if on_step is not None:
            on_step(step, config.steps, best_conv)
        if config.early_stop and bool(frozen.all()):
            break

    cpu = torch.device("cpu")
    return SearchResult(
        hr=best_hr.detach().to(cpu),
        lr=best_lr.detach().to(cpu),
        latent=best_latent.to(cpu),
        noise=[m.to(cpu) for m in best_noise],
        best_step=best_step.to(cpu),
        mse=best_mse.to(cpu),
        terms={k: v.detach().to(cpu) for k, v in best_terms.items()},
        converged=best_conv.to(cpu) & (best_mse.to(cpu) <= config.eps),
        steps_run=steps_run,
        row_steps=row_steps.to(cpu),
        history={k: torch.stack(v).to(cpu) for k, v in history.items()},
        seconds=time.perf_counter() - started,
        precision=execution.precision,
        checkpointed=checkpointed,
    )
