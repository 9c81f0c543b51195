"""The generator protocol the search needs, whatever the network family.

PULSE only needs: the shape of the latent it optimises on the sphere, how that latent maps to the
network's input (the prior transform), the shapes of the per-layer noise inputs, the output
resolution and a differentiable `synthesize`. Everything family-specific lives behind this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


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

    def feature_layers(self) -> dict[str, nn.Module]:
        """Split points for the intermediate-layer search: name -> module, coarse to fine.

        Each module's output (or the first element of a tuple output) is a feature map
        (B, C, H, W) that an offset may be added to. Empty: the mode is not available.
        """
        return {}

    def prior(self, latent: torch.Tensor) -> torch.Tensor:
        """Map the optimised latent (B, L, D), kept on a sphere, to the network's input w.

        The identity for plain Gaussian-prior generators; StyleGAN overrides it with the
        Gaussian fit of its mapping network.
        """
        return latent

    @abstractmethod
    def synthesize(self, w: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        """Raw image (B, 3, R, R), about [-1, 1], from w (B, L, D) and the noise maps."""

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
