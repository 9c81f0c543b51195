"""The generator protocol the search needs, whatever the network family.

PULSE only needs: the shape of the latent it optimises on the sphere, how that latent maps to the
network's input (the prior transform), the shapes of the per-layer noise inputs, the output
resolution and a differentiable `synthesize`. Everything family-specific lives behind this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from pulse_core.errors import ModelFileError
from pulse_core.generators.gaussian_fit import (
    FIT_CHUNK,
    FIT_SAMPLES,
    FIT_SEED,
    FinalActivation,
    GaussianFit,
    compute_gaussian_fit,
)

# A per-call change of the feature maps at the split points: edit(split-point name, x) -> x'.
# It travels with each `synthesize` call instead of living on the (shared, read-only) network,
# so concurrent searches on one cached generator never see each other's offsets.
FeatureEdit = Callable[[str, torch.Tensor], torch.Tensor]

# A memory profile in progress (pulse_core.memory._Probe), per call context: each synthesis
# block tells it where it begins and ends, so one counting forward pass learns what every block
# keeps for the backward pass. None (always, outside `memory.profile_step`): no cost.
BLOCK_PROBE: ContextVar[Any] = ContextVar("pulse_block_probe", default=None)


def run_segment(fn: Callable[..., Any], *args: Any, checkpoint: bool = False) -> Any:
    """`fn(*args)`: one synthesis block, optionally under activation checkpointing.

    With `checkpoint` (and gradients on) the block keeps only its inputs; its activations are
    recomputed during the backward pass, one block at a time, which bounds a step's memory by
    the largest block instead of the whole network (StyleGAN3-T 1024 on the CPU: see
    docs/benchmarks.md). Non-reentrant checkpointing: gradients w.r.t. the inputs (all PULSE
    needs) are exact, and the recomputation replays the same ops and autocast state, so results
    equal the plain path's. The generator is not touched: the choice travels with the call.
    """
    probe = BLOCK_PROBE.get()
    if probe is not None:
        probe.begin()
        out = fn(*args)
        probe.end(out)
        return out
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Generator(nn.Module, ABC):
    """A frozen generator G: latent (B, L, D) [+ noise maps] -> image (B, 3, R, R) in ~[-1, 1]."""

    family: str = "unknown"

    def __init__(self) -> None:
        super().__init__()
        self.model_id = "unnamed"  # catalogue name or file name; recorded in manifests
        self.checksum = ""  # sha256 of the weights file(s); recorded in manifests

    @property
    @abstractmethod
    def resolution(self) -> int:
        """Side of the square output image in pixels."""

    @property
    @abstractmethod
    def num_latents(self) -> int:
        """L: number of style inputs (1 for a single-latent generator such as DCGAN)."""

    @property
    @abstractmethod
    def latent_dim(self) -> int:
        """D: size of each latent vector."""

    @property
    def noise_shapes(self) -> tuple[tuple[int, int], ...]:
        """(H, W) of each per-layer noise input; empty when the network takes none."""
        return ()

    def feature_layers(self) -> dict[str, int]:
        """Split points for the intermediate-layer search: name -> spatial side, coarse to fine.

        At each split point `synthesize` hands its feature map (B, C, H, W), H = W = the side, to
        the call's `edit`. Names only, never modules: nothing outside may hook the network.
        Empty: the mode is not available.
        """
        return {}

    def prior(self, latent: torch.Tensor) -> torch.Tensor:
        """Map the optimised latent (B, L, D), kept on a sphere, to the network's input w.

        The identity for plain Gaussian-prior generators; StyleGAN overrides it with the
        Gaussian fit of its mapping network.
        """
        return latent

    @abstractmethod
    def synthesize(
        self,
        w: torch.Tensor,  # (B, L, D) the network's input
        noise: list[torch.Tensor],  # one (B or 1, 1, h, w) map per `noise_shapes` entry
        edit: FeatureEdit | None = None,  # applied at every split point; None = the plain network
    ) -> torch.Tensor:
        """Raw image (B, 3, R, R), about [-1, 1], from w, the noise maps and an optional edit.

        With `edit=None` the result is bit-identical to the network without split points.
        """

    supports_checkpoint: bool = False  # `synthesize_checkpointed` saves memory (per block)

    def synthesize_checkpointed(
        self,
        w: torch.Tensor,  # as `synthesize`
        noise: list[torch.Tensor],
        edit: FeatureEdit | None = None,
    ) -> torch.Tensor:
        """`synthesize` with activation checkpointing per block (`run_segment`): equal results,
        less memory, one more forward pass of compute. Families without blocks run plain."""
        return self.synthesize(w, noise, edit)

    @property
    def device(self) -> torch.device:
        """Where the weights live: the search and the faces stage run there."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def freeze(self) -> Generator:
        """Eval mode, no parameter gradients: the search only needs gradients w.r.t. inputs."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def describe(self) -> str:
        return (
            f"{self.model_id} ({self.family}, {self.resolution}x{self.resolution}, "
            f"latent {self.num_latents}x{self.latent_dim}, {len(self.noise_shapes)} noise inputs)"
        )


# ----------------------------------------------------------------------------


class StyleGenerator(Generator):
    """What the StyleGAN families share behind the protocol: W+ and the Gaussian fit of W.

    A subclass sets `synthesis` (with `img_resolution`, `num_ws` and `w_dim`), `mapping` (z -> w,
    or None when only a shipped fit is known), `final_activation` (the mapping's last activation,
    which the fit undoes and `prior` applies again), and calls `_init_fit` in its constructor.
    The fit is set once at load time, before the generator is cached and shared.
    """

    synthesis: nn.Module
    mapping: nn.Module | None
    final_activation: FinalActivation

    def _init_fit(self, fit: GaussianFit | None, *, persistent: bool) -> None:
        """Register the fit buffers (empty until a fit is set). `persistent`: in `state_dict()`
        (StyleGAN v1's always carried them; StyleGAN2/3 keep their keys exactly NVIDIA's)."""
        self.register_buffer("fit_mean", torch.zeros(0), persistent=persistent)
        self.register_buffer("fit_std", torch.zeros(0), persistent=persistent)
        if fit is not None:
            self.set_gaussian_fit(fit)

    @property
    def resolution(self) -> int:
        return int(self.synthesis.img_resolution)

    @property
    def num_latents(self) -> int:
        return int(self.synthesis.num_ws)

    @property
    def latent_dim(self) -> int:
        return int(self.synthesis.w_dim)

    @property
    def has_gaussian_fit(self) -> bool:
        return self.fit_mean.numel() > 0

    @property
    def fit(self) -> GaussianFit:
        return GaussianFit(mean=self.fit_mean.detach().cpu(), std=self.fit_std.detach().cpu())

    def set_gaussian_fit(self, fit: GaussianFit) -> None:
        mean, std = fit.mean.reshape(-1), fit.std.reshape(-1)
        if mean.shape != (self.latent_dim,) or std.shape != (self.latent_dim,):
            raise ModelFileError(
                f"Gaussian fit has {tuple(fit.mean.shape)} dims, the network's W has "
                f"{self.latent_dim}"
            )
        device = self.fit_mean.device
        self.fit_mean = mean.detach().float().to(device).clone()
        self.fit_std = std.detach().float().to(device).clone()

    def prior(self, latent: torch.Tensor) -> torch.Tensor:
        if not self.has_gaussian_fit:
            raise ModelFileError(
                f"{self.model_id}: no Gaussian fit of W yet (call ensure_gaussian_fit)"
            )
        return self.final_activation.forward(latent * self.fit_std + self.fit_mean)

    def map_to_w(self, z: torch.Tensor) -> torch.Tensor:
        """One w per z, (N, z_dim) -> (N, w_dim): what the fit is taken over."""
        if self.mapping is None:
            raise ModelFileError(f"{self.model_id} has no mapping network to fit W from")
        return self.mapping(z)

    @property
    def z_dim(self) -> int:
        if self.mapping is None:
            raise ModelFileError(f"{self.model_id} has no mapping network (no z)")
        return int(self.mapping.z_dim)

    def compute_gaussian_fit(
        self,
        samples: int = FIT_SAMPLES,
        seed: int = FIT_SEED,
        chunk: int = FIT_CHUNK,
        progress: Callable[[int, int], None] | None = None,
    ) -> GaussianFit:
        """The fit of this mapping network's W with its final activation undone."""
        return compute_gaussian_fit(
            self.map_to_w,
            self.z_dim,
            samples,
            seed,
            chunk,
            self.fit_mean.device,
            progress,
            inverse=self.final_activation.inverse,
        )


def require_same_tensors(
    ours: Mapping[str, torch.Tensor],  # the network's state_dict()
    theirs: Mapping[str, torch.Tensor],  # what a model file provides, in our names
    what: str,  # the error's opening: which file and which architecture
) -> None:
    """Every tensor of the file has a place in our network, with its shape, and every one of ours
    is filled: else a ModelFileError listing (up to 8 of) each kind of mismatch, so no tensor is
    silently skipped or left at its random initial value. Run before `load_state_dict`."""
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = sorted(
        f"{k} {tuple(theirs[k].shape)} != {tuple(ours[k].shape)}"
        for k in set(ours) & set(theirs)
        if tuple(theirs[k].shape) != tuple(ours[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}")
    if shapes:
        problems.append(f"wrong shape(s): {'; '.join(shapes[:8])}")
    if problems:
        raise ModelFileError(f"{what}: " + "; ".join(problems))
