"""`precision`: the synthesis under autocast, everything the search keeps in fp32.

bf16 must find samples within eps as often as fp32 (docs/benchmarks.md has the numbers over
more inputs); fp16, which CPUs cannot run well, is refused with what to use instead.
"""

from __future__ import annotations

import pytest
import torch

from pulse_core.downscale import downscale
from pulse_core.errors import ConfigError
from pulse_core.generators.base import Generator
from pulse_core.search import Execution, SearchConfig, initial_state, search, sphere_norm
from pulse_core.settings import RestoreSettings
from tests.test_stylegan2 import tiny_stylegan2


def _own_targets(gen: Generator, rows: int, factor: int, config: SearchConfig) -> torch.Tensor:
    """LR images of the generator's own samples: targets a search can reach within eps."""
    start = initial_state(gen, list(range(500, 500 + rows)), config)
    with torch.no_grad():
        hr = (gen.synthesize(gen.prior(start.latent), start.noise) + 1) / 2
    return downscale(hr, factor)


def _converged(gen: Generator, config: SearchConfig, factor: int, rows: int) -> dict[str, int]:
    targets = _own_targets(gen, rows, factor, config)
    init = initial_state(gen, list(range(rows)), config)
    counts = {}
    for precision in ("fp32", "bf16"):
        out = search(gen, targets, init, config, execution=Execution(precision=precision))
        assert out.precision == precision
        assert out.hr.dtype == torch.float32 and out.latent.dtype == torch.float32
        counts[precision] = int(out.converged.sum())
    return counts


@pytest.mark.slow
def test_bf16_converges_as_often_as_fp32_on_the_demo_generator(demo_generator):
    config = SearchConfig(steps=40, eps=4e-3, early_stop=True)
    counts = _converged(demo_generator, config, factor=8, rows=6)
    assert counts["fp32"] >= 3, counts  # the comparison means something
    assert counts["bf16"] >= counts["fp32"] - 1, counts


@pytest.mark.slow
def test_bf16_converges_as_often_as_fp32_on_a_random_stylegan2():
    gen = tiny_stylegan2(16, seed=2)
    gen.set_gaussian_fit(gen.compute_gaussian_fit(samples=5000))
    config = SearchConfig(steps=60, eps=2e-4, early_stop=True)
    counts = _converged(gen, config, factor=4, rows=4)
    assert counts["fp32"] >= 3, counts
    assert counts["bf16"] >= counts["fp32"] - 1, counts


def test_bf16_keeps_the_latents_on_their_sphere_in_fp32():
    gen = tiny_stylegan2(16, seed=2)
    gen.set_gaussian_fit(gen.compute_gaussian_fit(samples=2000))
    config = SearchConfig.reference().with_(steps=3)
    init = initial_state(gen, [1, 2], config)
    out = search(gen, torch.rand(2, 3, 4, 4), init, config, execution=Execution(precision="bf16"))
    assert torch.allclose(sphere_norm(out.latent), sphere_norm(init.latent), rtol=1e-5)
    assert torch.isfinite(out.mse).all()


def test_fp16_on_the_cpu_is_refused_with_what_to_use():
    gen = tiny_stylegan2(16, seed=2)
    gen.set_gaussian_fit(gen.compute_gaussian_fit(samples=500))
    config = SearchConfig.reference().with_(steps=1)
    init = initial_state(gen, [1], config)
    with pytest.raises(ConfigError, match="use bf16"):
        search(gen, torch.rand(1, 3, 4, 4), init, config, execution=Execution(precision="fp16"))
    with pytest.raises(ConfigError, match="use bf16"):
        RestoreSettings(device="cpu", precision="fp16")


def test_unknown_precision_and_checkpoint_modes_are_refused():
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
        Execution(precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="auto, on, off"):
        RestoreSettings(checkpoint="sometimes")  # type: ignore[arg-type]


def test_fp32_is_the_default_and_the_settings_carry_the_execution():
    assert Execution() == RestoreSettings().execution()
    assert Execution().precision == "fp32" and not Execution().compile
    settings = RestoreSettings(precision="bf16", checkpoint="on", compile=True)
    assert settings.execution() == Execution(precision="bf16", checkpoint="on", compile=True)


@pytest.mark.slow
def test_a_compiled_synthesis_gives_the_plain_results():
    from tests.helpers import tiny_dcgan

    gen = tiny_dcgan()
    config = SearchConfig.reference().with_(steps=2)
    targets = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    init = initial_state(gen, [1, 2], config)
    plain = search(gen, targets, init, config)
    compiled = search(gen, targets, init, config, execution=Execution(compile=True))
    assert torch.allclose(plain.hr, compiled.hr, rtol=0, atol=1e-6)
    assert torch.allclose(plain.latent, compiled.latent, rtol=0, atol=1e-6)
