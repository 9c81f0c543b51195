"""PULSE photo upsampling (Menon et al., CVPR 2020) as a library.

`restore(image, generator, samples=4)` works on one in-memory image; `load_generator("demo")`
or a path gives a generator. Nothing here imports Prefect or Dask.
"""

from pulse_core.downscale import OPERATORS, downscale
from pulse_core.errors import ConfigError, InputError, ModelFileError, PulseError, StorageError
from pulse_core.generators.base import Generator
from pulse_core.generators.loading import load_generator
from pulse_core.losses import DEFAULT_LOSS, parse_loss
from pulse_core.restore import RestoreResult, SampleResult, restore, restore_many
from pulse_core.search import (
    Execution,
    InitialState,
    SearchConfig,
    SearchResult,
    initial_state,
    preset,
    search,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LOSS",
    "OPERATORS",
    "ConfigError",
    "Execution",
    "Generator",
    "InitialState",
    "InputError",
    "ModelFileError",
    "PulseError",
    "RestoreResult",
    "SampleResult",
    "SearchConfig",
    "SearchResult",
    "StorageError",
    "downscale",
    "initial_state",
    "load_generator",
    "parse_loss",
    "preset",
    "restore",
    "restore_many",
    "search",
]
