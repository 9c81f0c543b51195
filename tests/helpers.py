"""Small random-weight generators for fast tests (no weights files needed)."""

from __future__ import annotations

import torch

from pulse_core.generators.dcgan import DCGANGenerator
from pulse_core.generators.stylegan1 import StyleGAN1Generator, StyleGAN1Mapping, StyleGAN1Synthesis


def tiny_stylegan1(resolution: int = 16, channels: int = 8, seed: int = 0) -> StyleGAN1Generator:
    """A StyleGAN v1 with randomised biases and noise strengths (so noise matters)."""
    torch.manual_seed(seed)
    n_blocks = resolution.bit_length() - 2
    synthesis = StyleGAN1Synthesis(resolution, channels=[channels] * n_blocks, w_dim=32)
    mapping = StyleGAN1Mapping(z_dim=32, w_dim=32, depth=2)
    with torch.no_grad():
        for name, p in synthesis.named_parameters():
            if name.endswith("noise.weight") or name.endswith("bias"):
                p.normal_(0, 0.3)
    gen = StyleGAN1Generator(synthesis, torch.zeros(32), torch.ones(32), mapping=mapping)
    gen.model_id = f"tiny-stylegan1-{resolution}"
    return gen.freeze()


def tiny_dcgan(seed: int = 0) -> DCGANGenerator:
    torch.manual_seed(seed)
    gen = DCGANGenerator(nz=16, ngf=8)
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    gen.model_id = "tiny-dcgan"
    return gen.freeze()
