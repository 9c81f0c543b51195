"""The one description of a restore: `RestoreSettings` (holding a `SearchConfig`).

Every entry point builds one and passes it whole: `pulse upsample` and `pulse run` through the
argparse options generated from these dataclasses (`pulse_cli.options`), the Prefect flow as a
typed parameter (Prefect validates it with pydantic, and the deployment's run form shows each
field with its description and the `Literal` choices as dropdowns), notebooks directly.

A preset and its overrides are resolved once (`resolved()`): from then on `settings.search` holds
the effective values, which is what the report, the manifest and the UI show. Values are checked
when a settings object is built, so nothing downstream validates again.

`PipelineOptions` says how a run is executed (fan-out, retries of the whole run, failures
allowed); it does not change a single output pixel, which is why it is kept apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

from pulse_core.errors import ConfigError
from pulse_core.imaging import DEFAULT_MAX_PIXELS, FIT_POLICIES
from pulse_core.memory import CheckpointMode, Precision
from pulse_core.search import (
    DEFAULT_PRESET,
    Execution,
    PresetName,
    SearchConfig,
    option,
    preset,
)

FitPolicy = Literal["center-crop", "pad", "none"]
Device = Literal[
    "auto",
    "cpu",
    "cuda",
    "mps",
    "cuda:0",
    "cuda:1",
    "cuda:2",
    "cuda:3",
    "cuda:4",
    "cuda:5",
    "cuda:6",
    "cuda:7",
]  # a dropdown in the Prefect form; more GPUs per box: one worker each, CUDA_VISIBLE_DEVICES
TaskRunner = Literal["threads", "dask"]
TASK_RUNNERS: tuple[str, ...] = get_args(TaskRunner)
FaceMode = Literal["none", "align", "paste"]
FaceRecipe = Literal["auto", "ffhq", "digiface"]
AUTO_PLANNING_ROWS = 32  # search_batch=0 (auto): rows assumed when grouping inputs
MAX_UPSCALE = 16  # a 4000 px photo at x16 is 64000 px wide: far past what anyone means
assert set(get_args(FitPolicy)) == set(FIT_POLICIES), "FitPolicy lists imaging's policies"


@dataclass(frozen=True)
class RestoreSettings:
    """What to restore with: the model, the search and the input handling, for a whole run."""

    model: str = option("demo", "generator: a catalogue name or a path every worker can read")
    samples: int = option(4, "HR samples per input")
    resample: int = option(
        0, "how many of the samples come from noise resampling of the best restart (StyleGAN)"
    )
    preset: PresetName = option(
        DEFAULT_PRESET,
        "base search settings: robust (product default: intermediate-layer search, early stop, "
        "restarts), fast (the paper + early stop) or reference (the paper, exactly)",
    )
    search: SearchConfig | None = option(
        None, "the search settings, complete; empty = the preset's own"
    )
    seed: int = option(0, "base seed; each (input, sample) derives its own")
    fit: FitPolicy = option("center-crop", "how a non-square input is made square")
    device: Device = option("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    search_batch: int = option(
        0,
        "search rows (inputs x samples) per forward pass; 0 = auto: as many as the device's "
        "free memory holds (at most 32 on a CPU, 64 on a GPU); halved and retried on "
        "out-of-memory either way",
    )
    precision: Precision = option(
        "fp32",
        "synthesis precision: fp32, bf16 or fp16 (GPU only): autocast for the generator; the "
        "losses, sphere projection and optimiser stay fp32",
    )
    checkpoint: CheckpointMode = option(
        "auto",
        "activation checkpointing of the synthesis (less memory, ~1/3 more compute): auto "
        "(only when the plain path does not fit the free memory), on or off",
    )
    compile: bool = option(
        False,
        "torch.compile the synthesis: a one-off compile per process and generator (5 s for the "
        "demo, 140 s for StyleGAN2 256 on 2 CPU cores) for 5-10% faster CPU steps; meant for "
        "long-running GPU workers (docs/benchmarks.md)",
    )
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest input (width x height) decoded")
    faces: FaceMode = option(
        "none",
        "whole photos: none (every input is an LR face crop), align (find, align and restore "
        "each face of each photo) or paste (align, then paste the restored faces into the "
        "upscaled photo, DEST/<photo>/restored.png)",
    )
    upscale: int = option(2, "with faces=paste: the whole photo's enlargement (Lanczos background)")
    min_face_size: float = option(
        20.0,
        "with faces: smallest face side the detector searches, in photo pixels (< 12 "
        "enlarges the photo to find tiny faces)",
    )
    face_recipe: FaceRecipe = option(
        "auto",
        "with faces: how a face is framed for the generator: auto (digiface for the demo's DCGAN "
        "family, ffhq for StyleGAN families), ffhq or digiface",
    )

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        if not 0 <= self.resample < self.samples:
            raise ConfigError(
                f"resample must be between 0 and samples - 1 ({self.samples - 1}), "
                f"got {self.resample}"
            )
        if self.search_batch < 0:
            raise ConfigError(f"search_batch must be >= 0 (0 = auto), got {self.search_batch}")
        self.execution()  # checks precision and checkpoint (one check, in Execution)
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("precision fp16 needs a GPU; use bf16 on the CPU, or fp32")
        if self.fit not in FIT_POLICIES:
            raise ConfigError(
                f"unknown fit policy {self.fit!r}; choose one of: {', '.join(FIT_POLICIES)}"
            )
        if self.device not in get_args(Device):
            raise ConfigError(
                f"unknown device {self.device!r}: use auto, cpu, cuda, cuda:N (N < 8) or mps"
            )
        self._check_faces()
        preset(self.preset)  # an unknown preset fails here, with the choices
        if isinstance(self.search, dict):  # built from JSON without pydantic
            object.__setattr__(self, "search", SearchConfig(**self.search))

    def _check_faces(self) -> None:
        if self.faces not in get_args(FaceMode):
            raise ConfigError(
                f"unknown faces mode {self.faces!r}; choose one of: none, align, paste"
            )
        if self.face_recipe not in get_args(FaceRecipe):
            raise ConfigError(
                f"unknown face recipe {self.face_recipe!r}; choose one of: auto, ffhq, digiface"
            )
        if isinstance(self.upscale, bool) or not isinstance(self.upscale, int):
            raise ConfigError(f"upscale must be an integer, got {self.upscale!r}")
        if not 1 <= self.upscale <= MAX_UPSCALE:
            raise ConfigError(f"upscale must be between 1 and {MAX_UPSCALE}, got {self.upscale}")
        if not math.isfinite(self.min_face_size) or self.min_face_size <= 0:
            raise ConfigError(f"min_face_size must be > 0 pixels, got {self.min_face_size!r}")

    def recipe_for(self, family: str) -> str:
        """The alignment recipe for a generator family: `face_recipe`, with "auto" resolved.

        auto: "digiface" for the demo's DCGAN (trained on DigiFace-1M's tight crops), "ffhq"
        for everything else (the StyleGAN face models are FFHQ-aligned).
        """
        if self.face_recipe != "auto":
            return self.face_recipe
        return "digiface" if family == "dcgan" else "ffhq"

    @property
    def config(self) -> SearchConfig:
        """The effective search: `search` if given, else the preset's."""
        return self.search if self.search is not None else preset(self.preset)

    def resolved(self) -> RestoreSettings:
        """The same settings with `search` filled in: what a run records and shows."""
        return self if self.search is not None else replace(self, search=preset(self.preset))

    def execution(self) -> Execution:
        """How the searches run: precision, checkpointing, compile."""
        return Execution(precision=self.precision, checkpoint=self.checkpoint, compile=self.compile)

    @property
    def batch_rows(self) -> int | None:
        """`search_batch` for the search: None = auto (0 in the settings)."""
        return self.search_batch or None

    @property
    def planning_rows(self) -> int:
        """Rows a search is planned with before the device is known (grouping inputs into
        batches, progress bars): `search_batch`, or 32 when it is auto."""
        return self.search_batch or AUTO_PLANNING_ROWS

    @property
    def restarts(self) -> int:
        """Samples that come from new random starts (the others are noise resamples)."""
        return self.samples - self.resample


def build_settings(
    preset_name: str = DEFAULT_PRESET,
    search_overrides: dict[str, object] | None = None,
    **fields: object,
) -> RestoreSettings:
    """RestoreSettings from a preset, the search fields to change, and the other fields.

    The one place where a preset and its overrides meet: the CLI commands, the bench scripts
    and tests all come through here. `None` values mean "keep the preset's".
    """
    changes = {k: v for k, v in (search_overrides or {}).items() if v is not None}
    search = preset(preset_name).with_(**changes)
    kept = {k: v for k, v in fields.items() if v is not None}
    return RestoreSettings(preset=preset_name, search=search, **kept)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PipelineOptions:
    """How a run is executed: fan-out, limits, failure policy. Outputs do not depend on it."""

    inputs_per_task: int = option(8, "inputs per restore task (the unit of fan-out and retry)")
    task_runner: TaskRunner = option(
        "threads", "threads (in the flow's process) or dask (a LocalCluster or dask_address)"
    )
    max_workers: int = option(1, "threads, or LocalCluster worker processes")
    dask_address: str | None = option(
        None, "tcp://host:8786 of an existing Dask cluster (with task_runner dask)"
    )
    gpu_resource: bool = option(
        True, "with dask: send restore tasks only to workers started with --resources GPU=1"
    )
    limit: int | None = option(None, "restore at most this many pending inputs")
    force: bool = option(False, "redo inputs that are already restored")
    max_failures: int = option(0, "failed inputs allowed before the run is marked failed")
    storage_endpoint: str | None = option(
        None, "S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS itself)"
    )

    def __post_init__(self) -> None:
        if self.inputs_per_task < 1 or self.max_workers < 1:
            raise ConfigError("inputs_per_task and max_workers must be >= 1")
        if self.task_runner not in TASK_RUNNERS:
            raise ConfigError(
                f"unknown task_runner {self.task_runner!r}; choose one of: "
                f"{', '.join(TASK_RUNNERS)}"
            )
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.dask_address == "":  # an unset Prefect variable in prefect.yaml renders as ""
            object.__setattr__(self, "dask_address", None)


__all__ = [
    "TASK_RUNNERS",
    "Device",
    "FaceMode",
    "FaceRecipe",
    "FitPolicy",
    "PipelineOptions",
    "RestoreSettings",
    "TaskRunner",
    "build_settings",
]
