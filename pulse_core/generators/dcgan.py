"""The standard DCGAN generator (Radford et al. 2016; the PyTorch tutorial layout).

This is the demo generator's architecture: z in R^nz -> 4x4 -> ... -> 64x64 RGB with Tanh. Module
names mirror the `main.N` keys of the tutorial's state_dict so checkpoints load strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from pulse_core.errors import ModelFileError
from pulse_core.generators.base import FeatureEdit, Generator


class DCGANGenerator(Generator):
    family = "dcgan"

    def __init__(
        self,
        nz: int = 100,  # latent size
        ngf: int = 64,  # feature maps at the last hidden layer (x8, x4, x2, x1 going up)
        nc: int = 3,  # output channels
    ) -> None:
        super().__init__()
        self.nz = nz
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    @property
    def resolution(self) -> int:
        return 64

    @property
    def num_latents(self) -> int:
        return 1

    @property
    def latent_dim(self) -> int:
        return self.nz

    def feature_layers(self) -> dict[str, int]:
        """The ReLU output of each hidden block: 4x4, 8x8, 16x16, 32x32."""
        return {name: side for name, (_, side) in self._split_points().items()}

    def _split_points(self) -> dict[str, tuple[int, int]]:
        """name -> (index in `main` of the ReLU closing the block, its side)."""
        return {f"{4 * 2**i}x{4 * 2**i}": (3 * i + 2, 4 * 2**i) for i in range(4)}

    def synthesize(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        assert w.ndim == 3 and w.shape[1:] == (1, self.nz), f"w must be (B, 1, {self.nz})"
        x = w.reshape(w.shape[0], self.nz, 1, 1)
        if edit is None:
            return self.main(x)
        after = {index: name for name, (index, _) in self._split_points().items()}
        for index, layer in enumerate(self.main):
            x = layer(x)
            if index in after:
                x = edit(after[index], x)
        return x

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> DCGANGenerator:
        """Build with sizes inferred from the tensors, then load strictly."""
        try:
            nz, ngf8 = state["main.0.weight"].shape[:2]
            nc = state["main.12.weight"].shape[1]
        except KeyError as exc:
            raise ModelFileError(f"not a DCGAN generator state_dict: missing key {exc}") from None
        model = cls(nz=int(nz), ngf=int(ngf8) // 8, nc=int(nc))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(
                f"DCGAN state_dict does not match the architecture: {exc}"
            ) from None
        return model.freeze()
