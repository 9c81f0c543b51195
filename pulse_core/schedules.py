"""Optimisers and learning-rate schedules of the search (pulse-reference.md section 7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, get_args

import torch

from pulse_core.errors import ConfigError

Optimizer = Literal["adam", "sgd", "sgdm", "adamax"]  # the choices, declared once
Schedule = Literal["fixed", "linear1cycle", "linear1cycledrop"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base learning rate at 0-based `step` of `steps`."""
    s = float(steps)
    x = float(step)
    if schedule == "fixed":
        return 1.0
    if schedule == "linear1cycle":
        return (9.0 * (1.0 - abs(x / s - 0.5) * 2.0) + 1.0) / 10.0
    if schedule == "linear1cycledrop":
        if x < 0.9 * s:
            return (9.0 * (1.0 - abs(x / (0.9 * s) - 0.5) * 2.0) + 1.0) / 10.0
        return 0.1 + (x - 0.9 * s) / (0.1 * s) * (0.001 - 0.1)
    raise ConfigError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Torch optimiser with the reference's defaults (sgdm = SGD with momentum 0.9)."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamax":
        return torch.optim.Adamax(params, lr=lr)
    raise ConfigError(f"unknown optimiser {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def schedule_fn(schedule: str, steps: int) -> Callable[[int], float]:
    check_schedule(schedule)
    return lambda step: lr_factor(schedule, step, steps)
