"""Memory of a search step: an estimate per (generator, precision), the batch that fits, OOM retry.

Why: the top complaints about PULSE on cloud GPUs are CUDA out-of-memory and speed, and the
search batch used to be the user's guess (32 rows). A StyleGAN3-T 1024 step at batch 1 did not
even fit in 24 GiB of RAM (killed at 24.2 GB). Here the search learns what a step costs before
it runs and picks the batch (and activation checkpointing) to fit the device.

The model (measured, not tabulated per family)
-----------------------------------------------
A search step holds, besides the weights, what autograd saves for the backward pass: the
activations. They grow linearly with the batch, and rows of a batch are independent, so

    peak(batch) = fixed + batch * per_row

`profile_step` runs ONE forward pass of the synthesis at batch 1 (in the requested precision)
under `torch.autograd.graph.saved_tensors_hooks` whose pack hook only counts the bytes of each
saved tensor and drops it: the forward then costs no more memory than an inference pass, whatever
the model, yet we learn exactly what autograd would keep. The synthesis blocks report themselves
through `pulse_core.generators.base.run_segment`, so the same pass also gives what each block
saves and the tensors passed between blocks. Then, per row:

- plain:       saved(all) + TRANSIENT x largest saved tensor
- checkpoint:  boundaries(all) + saved(outside blocks) + max over blocks saved(block)
               + TRANSIENT x largest saved tensor

(with activation checkpointing a block keeps only its inputs; its inner activations come back,
one block at a time, during the backward pass). TRANSIENT (4) covers the gradient buffers and
the tensor being computed at the peak; the image, its downscale and the loss add a few
full-resolution images. `tests/test_memory.py` checks the estimate against the peak RSS of real
CPU steps at small resolutions (within a factor 2); docs/benchmarks.md has 1024 px numbers.

The profile is cached per loaded generator (a WeakKeyDictionary held here: nothing is set on
the shared generator) and per precision; it costs one batch-1 forward pass (milliseconds for
the demo model, ~10 s for StyleGAN3 1024 on 2 CPU cores).

Free memory: CUDA `mem_get_info` plus what torch's caching allocator holds unused; CPU the
kernel's MemAvailable (bounded by a cgroup limit) plus the free bytes glibc keeps in this
process's heap (`keep_freed_memory` keeps them for reuse). A safety share of it is budgeted.

Out of memory anyway (the estimate is an estimate; another process took memory): the caller
halves the batch and retries the same rows (`is_out_of_memory` recognises the errors).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from pulse_core.errors import ConfigError
from pulse_core.generators.base import BLOCK_PROBE, Generator

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
CheckpointMode = Literal["auto", "on", "off"]
CHECKPOINT_MODES: tuple[str, ...] = get_args(CheckpointMode)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

TRANSIENT = 4  # largest saved tensors alive besides the saved ones at the peak (grads, output)
IMAGE_COPIES = 8  # full-resolution fp32 images per row around the synthesis (image, best, grads)
SAFETY = {"cuda": 0.85, "cpu": 0.75}  # share of the free memory a search may plan to use
MAX_AUTO_BATCH = {"cuda": 64, "cpu": 32}  # CPUs gain little past 32 rows (docs/benchmarks.md)
MIN_PLAIN_ROWS = 4  # checkpoint="auto" keeps the faster plain path while it fits this many rows


def check_precision(precision: str, device: torch.device) -> None:
    """A ConfigError where a precision cannot run on a device, with what to use instead."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
        )
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(
            "precision fp16 needs a GPU: CPUs have no fast float16 convolutions (and some "
            "ops lack float16 kernels); use bf16 on the CPU, or fp32"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """The autocast region for the synthesis (fp32: none at all, so numerics are untouched)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


# ----------------------------------------------------------------------------
# The profile: one counting forward pass


@dataclass(frozen=True)
class StepProfile:
    """What one search row costs, measured by `profile_step` (bytes)."""

    fixed: int  # weights and buffers of the generator
    saved: int  # activations autograd keeps for the backward pass, whole synthesis
    outside: int  # of which saved outside the synthesis blocks (edits, output scaling)
    boundaries: int  # tensors passed between blocks (what checkpointing keeps)
    largest_block: int  # the most any one block saves (recomputed at once when checkpointed)
    largest_tensor: int  # the largest single saved tensor
    image: int  # one fp32 output image
    blocks: int  # number of blocks that reported themselves (0: no checkpointing possible)

    def per_row(self, checkpoint: bool) -> int:
        if checkpoint and self.blocks:
            kept = self.boundaries + self.outside + self.largest_block
        else:
            kept = self.saved
        return kept + TRANSIENT * self.largest_tensor + IMAGE_COPIES * self.image

    def peak(self, batch: int, checkpoint: bool) -> int:
        """Estimated peak bytes of a search step of `batch` rows, above the process baseline."""
        return self.fixed + batch * self.per_row(checkpoint)


class _Probe:
    """Counts saved tensors during a profiling forward; blocks report through BLOCK_PROBE."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude  # data pointers of the weights: kept anyway, counted in `fixed`
        self.alive: dict[tuple[int, tuple[int, ...]], weakref.ref[torch.Tensor]] = {}
        self.saved = 0
        self.largest_tensor = 0
        self.in_blocks = 0
        self.block_saved: list[int] = []
        self.boundaries = 0
        self._depth = 0
        self._start = 0

    def pack(self, t: torch.Tensor) -> None:
        ptr = t.data_ptr()
        if ptr in self.exclude or t.numel() == 0:
            return None
        key = (ptr, tuple(t.shape))
        seen = self.alive.get(key)
        if seen is not None and seen() is not None:
            return None  # the same tensor saved by a second op: stored once
        self.alive[key] = weakref.ref(t)
        size = t.numel() * t.element_size()
        self.saved += size
        self.largest_tensor = max(self.largest_tensor, size)
        return None

    def begin(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self._start = self.saved

    def end(self, outputs: object) -> None:
        self._depth -= 1
        if self._depth:
            return
        used = self.saved - self._start
        self.block_saved.append(used)
        self.in_blocks += used
        items = outputs if isinstance(outputs, tuple) else (outputs,)
        self.boundaries += sum(
            t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor)
        )


_PROFILES: weakref.WeakKeyDictionary[Generator, dict[str, StepProfile]] = (
    weakref.WeakKeyDictionary()
)
_PROFILES_LOCK = threading.Lock()


def profile_step(generator: Generator, precision: str = "fp32") -> StepProfile:
    """Measure (once per generator and precision) what a search row costs; see module doc."""
    with _PROFILES_LOCK:
        known = _PROFILES.get(generator, {}).get(precision)
    if known is not None:
        return known
    profile = _measure(generator, precision)
    with _PROFILES_LOCK:
        _PROFILES.setdefault(generator, {})[precision] = profile
    return profile


def _measure(generator: Generator, precision: str) -> StepProfile:
    device = generator.device
    tensors = [*generator.parameters(), *generator.buffers()]
    fixed = sum(t.numel() * t.element_size() for t in tensors)
    probe = _Probe({t.data_ptr() for t in tensors})
    w = torch.zeros(1, generator.num_latents, generator.latent_dim, device=device)
    w.requires_grad_(True)
    noise = [torch.zeros(1, 1, h, wd, device=device) for h, wd in generator.noise_shapes]
    token = BLOCK_PROBE.set(probe)
    try:
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(probe.pack, _unpack_dropped),
            autocast(device, precision),
        ):
            image = generator.synthesize(w, noise)
    finally:
        BLOCK_PROBE.reset(token)
    res = generator.resolution
    del image
    return StepProfile(
        fixed=fixed,
        saved=probe.saved,
        outside=probe.saved - probe.in_blocks,
        boundaries=probe.boundaries,
        largest_block=max(probe.block_saved, default=0),
        largest_tensor=probe.largest_tensor,
        image=3 * res * res * 4,
        blocks=len(probe.block_saved),
    )


def _unpack_dropped(_: None) -> torch.Tensor:
    raise RuntimeError("a profiling forward pass cannot be differentiated")


# ----------------------------------------------------------------------------
# Free memory and the plan


def _mallinfo_free() -> int:
    """Free bytes glibc keeps in this process's heap (0 where unknown)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6")

        class MallInfo2(ctypes.Structure):
            _fields_ = [  # the layout of glibc's struct mallinfo2
                (name, ctypes.c_size_t)
                for name in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        libc.mallinfo2.restype = MallInfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError):
        return 0


def _cgroup_free() -> int | None:
    """Bytes left under this cgroup's (v2) memory limit; None when there is no limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device) -> int:
    """Memory a new search could use now: CUDA free (+ cached unused); CPU MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return 8 << 30  # mps and others: no query; a conservative 8 GiB
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:
        avail = 8 << 30
    limit = _cgroup_free()
    if limit is not None:
        avail = min(avail, limit)
    return avail + _mallinfo_free()


@dataclass(frozen=True)
class BatchPlan:
    """The rows per search and whether the synthesis is checkpointed, and why."""

    batch: int
    checkpoint: bool
    estimate: int | None  # estimated peak bytes of a step at `batch`; None: not estimated
    budget: int | None  # bytes the plan allowed; None: not estimated
    reason: str


def plan_batch(
    generator: Generator,
    rows: int,  # rows waiting to be searched (the batch is never larger)
    *,
    batch: int | None = None,  # None = auto
    checkpoint: str = "auto",  # auto | on | off
    precision: str = "fp32",
    budget: int | None = None,  # bytes; None = the device's free memory x SAFETY
) -> BatchPlan:
    """Pick the batch and checkpointing for `rows` rows on the generator's device.

    Nothing is measured when both are fixed. Auto checkpointing keeps the plain (faster) path
    while it fits `MIN_PLAIN_ROWS` rows (or all rows, if fewer), else checkpoints if that fits
    more rows. The auto batch is the most rows that fit (1 at least: a search is always tried,
    and an out-of-memory error then fails or halves it), at most MAX_AUTO_BATCH.
    """
    if checkpoint not in CHECKPOINT_MODES:
        raise ConfigError(
            f"unknown checkpoint mode {checkpoint!r}; choose one of: {', '.join(CHECKPOINT_MODES)}"
        )
    rows = max(1, rows)
    if batch is not None and checkpoint != "auto":
        return BatchPlan(min(batch, rows), checkpoint == "on", None, None, "fixed by settings")
    device = generator.device
    profile = profile_step(generator, precision)
    if budget is None:
        budget = int(available_bytes(device) * SAFETY.get(device.type, 0.75))
    cap = min(rows, batch or MAX_AUTO_BATCH.get(device.type, 32))

    def fits(ckpt: bool) -> int:
        free = budget - profile.fixed
        return max(0, min(cap, free // max(1, profile.per_row(ckpt))))

    if checkpoint == "auto":
        plain, ckpt = fits(False), fits(True)
        use = plain < min(cap, MIN_PLAIN_ROWS) and ckpt > plain and profile.blocks > 0
        why = "checkpointed: the plain path fits " + str(plain) if use else "plain path fits"
    else:
        use = checkpoint == "on"
        why = f"checkpoint {checkpoint} by settings"
    chosen = batch if batch is not None else max(1, fits(use))
    chosen = min(chosen, rows)
    return BatchPlan(chosen, use, profile.peak(chosen, use), budget, why)


# ----------------------------------------------------------------------------
# Out-of-memory errors

_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error or a failed CPU allocation (torch raises RuntimeError)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or any(s in text for s in _CPU_OOM)
    )


def release_cached(device: torch.device) -> None:
    """After an out-of-memory error: hand torch's cached blocks back before retrying."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = [
    "CHECKPOINT_MODES",
    "PRECISIONS",
    "BatchPlan",
    "CheckpointMode",
    "Precision",
    "StepProfile",
    "autocast",
    "available_bytes",
    "check_precision",
    "is_out_of_memory",
    "plan_batch",
    "profile_step",
]
