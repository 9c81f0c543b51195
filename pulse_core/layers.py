"""Offsets on intermediate feature maps: the "intermediate layer" mode of the search.

Plain PULSE can only return images on the generator's manifold; real archive photos are often
off it, and the search then never gets within eps. Following the idea of Intermediate Layer
Optimization (Daras et al., ICML 2021), the search may also add an offset to chosen feature maps
of the generator, each kept inside a ball whose radius is a fraction of that feature map's own
norm: a small radius keeps the image close to the manifold (realism), a larger one buys LR
consistency.

Mechanics: one `FeatureOffsets` per search call holds every piece of state (deltas, scales,
switch-on schedule) and is itself the `edit` callable handed to
`Generator.synthesize(w, noise, edit=offsets)`. At each split point (`Generator.feature_layers()`,
names -> sides) the network calls `edit(name, x)`, which adds `delta * norm_ref / sqrt(numel)`,
where `norm_ref` is the feature map's per-sample norm when the layer was switched on and `delta`
is the optimised tensor. That scaling makes `delta`'s entries O(1) whatever the layer's
magnitude, so one learning rate serves every layer; the ball constraint becomes
`||delta|| <= radius * sqrt(numel)`.

Why an argument and not forward hooks (the first build's way): a loaded generator is cached and
shared by every thread of a worker, and hooks registered on it for one search added that search's
offsets to every other search running at the same time (architecture.md, "A loaded generator is
shared and read-only"). Nothing here holds a module or touches the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pulse_core.errors import ConfigError
from pulse_core.generators.base import Generator

AUTO = "auto"
# Split points `auto` never picks: StyleGAN3's Fourier-feature `input` (before any convolution)
# shares its side with the first layers; `auto` has always chosen among layer outputs there, and
# keeping that keeps the robust preset's choice for StyleGAN3 unchanged. It stays available by name.
_NOT_AUTO = frozenset({"input"})


def auto_layers(generator: Generator) -> tuple[str, ...]:
    """The split points whose sides are closest to 1/8 and 1/4 of the output, coarse first.

    Measured on the demo generator (docs/evaluation.md, 106 real faces): offsets on 8x8 then
    16x16 of a 64 px output, radius 0.05, brought every 8x8 and 16x16 input within eps at about
    the realism of the generator's own samples; a single layer or a larger radius did worse.
    """
    sized = [(n, side) for n, side in generator.feature_layers().items() if n not in _NOT_AUTO]
    if not sized:
        raise ConfigError(f"{generator.model_id} has no split points for the intermediate mode")
    chosen: list[str] = []
    for fraction in (8, 4):
        target = generator.resolution / fraction
        name = min(sized, key=lambda item: abs(math.log2(item[1] / target)))[0]
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def resolve_layers(generator: Generator, names: tuple[str, ...]) -> dict[str, int]:
    """The named split points -> their sides, checked; an unknown name lists the known ones.

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

    name: str  # the split point (a key of Generator.feature_layers())
    radius: float  # ball radius relative to the feature map's norm
    delta: torch.Tensor | None = None  # (N, C, H, W), created at the first forward after enabling
    scale: torch.Tensor | None = None  # (N, 1, 1, 1): norm_ref / sqrt(numel)
    enabled: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the offset; x itself while the layer is off. The first call after switching
        on measures the reference norm and creates `delta` (zeros, so the image is unchanged)."""
        if not self.enabled:
            return x
        if self.delta is None:
            with torch.no_grad():
                n = x.shape[0]
                numel = x[0].numel()
                norm = x.detach().reshape(n, -1).norm(dim=1).clamp(min=1e-8)
                self.scale = (norm / math.sqrt(numel)).view(n, 1, 1, 1)
            self.delta = torch.zeros_like(x, requires_grad=True)
        if self.delta.shape != x.shape:
            raise ValueError(
                f"offset for {self.name} has shape {tuple(self.delta.shape)}, the feature map "
                f"{tuple(x.shape)}: one FeatureOffsets serves one search (one batch)"
            )
        return x + self.delta * self.scale

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
    """The intermediate-layer offsets of one search call, and the `edit` its forwards get.

    Create one per `search()` and pass it as `generator.synthesize(w, noise, edit=offsets)`;
    it reads the generator's split-point names once and never holds or changes the network.
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
        self.offsets = [LayerOffset(name, radius) for name in resolve_layers(generator, layers)]
        self._by_name = {off.name: off for off in self.offsets}
        start = int(start_fraction * steps)
        k = max(len(self.offsets), 1)
        self.enable_at = [start + (i * (steps - start)) // k for i in range(len(self.offsets))]

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The `FeatureEdit`: split point `name`'s feature map with its offset (if any) added."""
        off = self._by_name.get(name)
        return x if off is None else off.apply(x)

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
