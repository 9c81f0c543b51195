"""`EvalSettings`: what one evaluation measures, holding the `RestoreSettings` it restores with.

Like `RestoreSettings`, every field is an `option()` with its description, so `pulse eval`'s
options, the flow's typed parameter (the Prefect form) and the docs come from one place. The
restore itself is a whole `RestoreSettings` built by the same `build_settings` as every other
command: the evaluation measures exactly what `pulse upsample` and `pulse run` would produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pulse_core.downscale import OPERATORS, Operator
from pulse_core.errors import ConfigError
from pulse_core.evaluation.baselines import check_baselines
from pulse_core.evaluation.degrade import parse
from pulse_core.search import option
from pulse_core.settings import RestoreSettings

METRICS = ("niqe", "brisque", "identity")  # optional-by-choice metrics; the others always run
DEFAULT_SAMPLES = 2  # per input: enough for a diversity number, half the cost of the CLI's 4


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate: factors, forward operator, degradations, baselines, metrics."""

    restore: RestoreSettings = field(
        default=RestoreSettings(samples=DEFAULT_SAMPLES),
        metadata={"description": "the restore to evaluate (model, preset, search, samples...)"},
    )
    factors: tuple[int, ...] = option(
        (4, 8), "scale factors: each ground truth is downscaled by each (e.g. 4,8)"
    )
    lr_operator: Operator | None = option(
        None, "forward operator that makes the LR inputs; empty = the search's own operator"
    )
    degrade: tuple[str, ...] = option(
        (),
        "degradations of the LR inputs besides the clean one: noise<N> (sigma N/255), "
        "blur[<sigma>], saltpepper[<percent>], jpeg[<quality>]",
    )
    degrade_seed: int = option(0, "base seed of the degradations (each input derives its own)")
    baselines: tuple[str, ...] = option(
        ("nearest", "bicubic", "realesrgan"),
        "baseline upscalers measured beside PULSE: nearest, bicubic, realesrgan (Real-ESRGAN "
        "x4plus; needs `pulse models pull realesrgan`, else reported as not measured)",
    )
    metrics: tuple[str, ...] = option(
        METRICS,
        "optional metrics: niqe, brisque (OpenCV contrib), identity (dlib); LR consistency, "
        "PSNR/SSIM and diversity always run",
    )
    sheets: int = option(6, "contact sheets per factor and degradation (the first inputs)")
    write_samples: bool = option(
        True, "write every restored sample, its LR check and sheet under DEST/samples/"
    )
    limit: int | None = option(None, "evaluate at most this many ground-truth images")
    inputs_per_task: int = option(4, "ground-truth images per evaluation task (fan-out unit)")
    max_workers: int = option(1, "evaluation tasks run at once (threads)")
    storage_endpoint: str | None = option(
        None, "S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS itself)"
    )

    def __post_init__(self) -> None:
        for name in ("factors", "degrade", "baselines", "metrics"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.restore, dict):  # from JSON without pydantic
            object.__setattr__(self, "restore", RestoreSettings(**self.restore))
        if not self.factors or any(int(f) < 2 for f in self.factors):
            raise ConfigError(f"factors must be integers >= 2, got {self.factors}")
        if self.lr_operator is not None and self.lr_operator not in OPERATORS:
            raise ConfigError(
                f"unknown lr_operator {self.lr_operator!r}; choose one of: {', '.join(OPERATORS)}"
            )
        for name in self.degrade:
            parse(name)
        check_baselines(self.baselines)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ConfigError(
                f"unknown metric(s) {unknown}; optional metrics: {', '.join(METRICS)}"
            )
        if self.restore.faces != "none":
            raise ConfigError("pulse eval restores aligned faces: use faces=none")
        if self.inputs_per_task < 1 or self.max_workers < 1 or self.sheets < 0:
            raise ConfigError("inputs_per_task and max_workers must be >= 1, sheets >= 0")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")

    @property
    def operator(self) -> str:
        """The operator that makes the LR inputs (the search's unless set)."""
        return self.lr_operator or self.restore.config.operator

    @property
    def degradations(self) -> tuple[str, ...]:
        return ("clean", *(d for d in self.degrade if d != "clean"))

    def resolved(self) -> EvalSettings:
        from dataclasses import replace

        return replace(self, restore=self.restore.resolved())


__all__ = ["DEFAULT_SAMPLES", "METRICS", "EvalSettings"]
