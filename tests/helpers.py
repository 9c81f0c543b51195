"""Small random-weight generators for fast tests (no weights files needed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def flow_args(**kwargs: object) -> dict[str, object]:
    """Flat test options -> the flow's typed parameters (settings, options) plus the rest.

    `steps=3, samples=1, inputs_per_task=1, return_state=True` becomes
    `settings=RestoreSettings(...)`, `options=PipelineOptions(...)`, `return_state=True`:
    the same split `pulse run` makes, through the same builder.
    """
    from dataclasses import fields

    from pulse_core.search import DEFAULT_PRESET, SearchConfig
    from pulse_core.settings import PipelineOptions, RestoreSettings, build_settings

    def take(names: set[str]) -> dict[str, object]:
        return {k: kwargs.pop(k) for k in list(kwargs) if k in names}

    search = take({f.name for f in fields(SearchConfig)})
    restore = take({f.name for f in fields(RestoreSettings)} - {"search"})
    options = take({f.name for f in fields(PipelineOptions)})
    name = str(restore.pop("preset", DEFAULT_PRESET))
    settings = build_settings(name, search, **restore)
    return {"settings": settings, "options": PipelineOptions(**options), **kwargs}  # type: ignore[arg-type]


def run_restore(source: str, dest: str, **kwargs: object):
    """`restore_archive` with flat test options (see `flow_args`)."""
    from flows.restore import restore_archive

    return restore_archive(source, dest, **flow_args(**kwargs))


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An in-process moto S3 server on a free 127.0.0.1 port; yields its endpoint URL.

    For fast unit tests only: moto checks no signatures (integration tests use SeaweedFS).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
