"""Offsets on intermediate feature maps: the "intermediate layer" mode of the search.

Plain PULSE can only return images on the generator's manifold; real archive photos are often
off it, and the search then never gets within eps. Following the idea of Intermediate Layer
Optimization (Daras et al., ICML 2021), the search may also add an offset to chosen feature maps
of the generator, each kept inside a ball whose radius is a fraction of that feature map's own
norm: a small radius keeps the image close to the manifold (realism), a larger one buys LR
consistency.

Mechanics: forward hooks on the generator's split-point modules (`Generator.feature_layers()`)
add `delta * norm_ref / sqrt(numel)` to the module's output, where `norm_ref` is the feature
map's per-sample norm when the layer was switched on and `delta` is the optimised tensor. That
scaling makes `delta`'s entries O(1) whatever the layer's magnitude, so one learning rate serves
every layer; the ball constraint becomes `||delta|| <= radius * sqrt(numel)`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pulse_core.errors import ConfigError
from pulse_core.generators.base import Generator

AUTO = "auto"
_SIZE_PATTERNS = (
    re.compile(r"^(\d+)x\1$"),
    re.compile(r"^b(\d+)$"),
    re.compile(r"^L\d+_(\d+)_\d+$"),
)


def feature_size(name: str) -> int | None:
    """Spatial side of a split point from its name: "16x16", "b16" (StyleGAN2), "L3_36_512"."""
    for pattern in _SIZE_PATTERNS:
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def auto_layers(generator: Generator) -> tuple[str, ...]:
    """The split points whose sides are closest to 1/8 and 1/4 of the output, coarse first.

    Measured on the demo generator (docs/evaluation.md, 106 real faces): offsets on 8x8 then
    16x16 of a 64 px output, radius 0.05, brought every 8x8 and 16x16 input within eps at about
    the realism of the generator's own samples; a single layer or a larger radius did worse.
    """
    sized = [(n, feature_size(n)) for n in generator.feature_layers()]
    sized = [(n, size) for n, size in sized if size is not None]
    if not sized:
        raise ConfigError(f"{generator.model_id} has no split points for the intermediate mode")
    chosen: list[str] = []
    for fraction in (8, 4):
        target = generator.resolution / fraction
        name = min(sized, key=lambda item: abs(math.log2(item[1] / target)))[0]
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def resolve_layers(generator: Generator, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """The named split points, checked; an unknown name lists the generator's split points.

    `("auto",)` picks one by `auto_layers`.
    """
    available = generator.feature_layers()
    if tuple(names) == (AUTO,):
        names = auto_layers(generator)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(
            f"{generator.model_id} has no intermediate layer {unknown}; its split points are: "
            f"{', '.join(available) or '(none)'}"
        )
    return {n: available[n] for n in names}


@dataclass
class LayerOffset:
    """The optimised offset of one feature map, for a batch of N samples."""

    name: str
    module: nn.Module
    radius: float  # ball radius relative to the feature map's norm
    delta: torch.Tensor | None = None  # (N, C, H, W), created at the first forward after enabling
    scale: torch.Tensor | None = None  # (N, 1, 1, 1): norm_ref / sqrt(numel)
    enabled: bool = False
    active_rows: torch.Tensor | None = None  # (N,) bool; frozen rows get no offset updates
    _handle: Any = field(default=None, repr=False)

    def hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not self.enabled:
            return None
        x = output[0] if isinstance(output, tuple) else output
        if self.delta is None:
            with torch.no_grad():
                n = x.shape[0]
                numel = x[0].numel()
                norm = x.detach().reshape(n, -1).norm(dim=1).clamp(min=1e-8)
                self.scale = (norm / math.sqrt(numel)).view(n, 1, 1, 1)
            self.delta = torch.zeros_like(x, requires_grad=True)
        x = x + self.delta * self.scale
        return (x, *output[1:]) if isinstance(output, tuple) else x

    @torch.no_grad()
    def project(self) -> None:
        """Scale each sample's delta back into its ball: ||delta|| <= radius * sqrt(numel)."""
        if self.delta is None:
            return
        n = self.delta.shape[0]
        limit = self.radius * math.sqrt(self.delta[0].numel())
        norms = self.delta.reshape(n, -1).norm(dim=1).clamp(min=1e-12)
        factor = (limit / norms).clamp(max=1.0).view(n, 1, 1, 1)
        self.delta.mul_(factor)

    def offset_norm(self) -> torch.Tensor:
        """Per-sample ||offset|| / ||feature|| (0 before the layer is on)."""
        if self.delta is None:
            return torch.zeros(0)
        n = self.delta.shape[0]
        return (self.delta.detach().reshape(n, -1).norm(dim=1)) / math.sqrt(self.delta[0].numel())


class FeatureOffsets:
    """Hooks on a generator's split points; attach for one search, then detach.

    Layers switch on progressively: layer i of k at step `start + i * (steps - start) / k`.
    """

    def __init__(
        self,
        generator: Generator,
        layers: tuple[str, ...],  # split-point names, coarse to fine
        radius: float,  # ball radius relative to each feature map's norm (e.g. 0.1)
        steps: int,  # the search's total steps
        start_fraction: float,  # when the first layer switches on, as a fraction of steps
    ) -> None:
        if radius <= 0:
            raise ConfigError(f"intermediate radius must be > 0, got {radius}")
        if not 0 <= start_fraction < 1:
            raise ConfigError(f"intermediate start must be in [0, 1), got {start_fraction}")
        modules = resolve_layers(generator, layers)
        self.offsets = [LayerOffset(name, m, radius) for name, m in modules.items()]
        start = int(start_fraction * steps)
        k = max(len(self.offsets), 1)
        self.enable_at = [start + (i * (steps - start)) // k for i in range(len(self.offsets))]

    def __enter__(self) -> FeatureOffsets:
        for off in self.offsets:
            off._handle = off.module.register_forward_hook(off.hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for off in self.offsets:
            if off._handle is not None:
                off._handle.remove()
                off._handle = None

    def switch_on(self, step: int) -> list[LayerOffset]:
        """Layers to enable at this step (their deltas appear at the next forward)."""
        turned = []
        for off, at in zip(self.offsets, self.enable_at, strict=True):
            if not off.enabled and step >= at:
                off.enabled = True
                turned.append(off)
        return turned

    def new_params(self) -> list[torch.Tensor]:
        """Deltas created by the last forward that the optimiser does not hold yet."""
        return [off.delta for off in self.offsets if off.delta is not None]

    def project(self) -> None:
        for off in self.offsets:
            off.project()
