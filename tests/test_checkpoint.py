"""Activation checkpointing of the synthesis: equal results, less memory kept, chosen when needed.

Checkpointing (`Generator.synthesize_checkpointed`, per block through `base.run_segment`) must
change nothing but memory: the same image, the same input gradients, the same search.
"""

from __future__ import annotations

import pytest
import torch

from pulse_core.generators.base import Generator
from pulse_core.generators.stylegan3 import StyleGAN3Generator
from pulse_core.memory import plan_batch, profile_step
from pulse_core.search import Execution, SearchConfig, initial_state, search
from tests.helpers import tiny_stylegan1
from tests.test_stylegan2 import tiny_stylegan2


def _stylegan2() -> Generator:
    gen = tiny_stylegan2(16, seed=1)
    gen.set_gaussian_fit(gen.compute_gaussian_fit(samples=2000))
    return gen


def _stylegan3() -> Generator:
    return StyleGAN3Generator.random(16, num_layers=4, fit_samples=2000)


MAKERS = {"stylegan1": lambda: tiny_stylegan1(16), "stylegan2": _stylegan2, "stylegan3": _stylegan3}


@pytest.fixture(params=sorted(MAKERS))
def gen(request: pytest.FixtureRequest) -> Generator:
    return MAKERS[request.param]()


def _forward_and_grad(gen: Generator, checkpoint: bool) -> tuple[torch.Tensor, torch.Tensor]:
    config = SearchConfig.reference()
    start = initial_state(gen, [3, 4], config)
    w = gen.prior(start.latent).detach().requires_grad_(True)
    synth = gen.synthesize_checkpointed if checkpoint else gen.synthesize
    image = synth(w, start.noise)
    image.square().mean().backward()
    assert w.grad is not None
    return image.detach(), w.grad


def test_checkpointed_synthesis_gives_the_same_image_and_gradients(gen):
    assert gen.supports_checkpoint
    plain_image, plain_grad = _forward_and_grad(gen, checkpoint=False)
    ckpt_image, ckpt_grad = _forward_and_grad(gen, checkpoint=True)
    assert torch.equal(plain_image, ckpt_image)
    assert torch.allclose(plain_grad, ckpt_grad, rtol=1e-6, atol=1e-9)


def test_a_checkpointed_search_equals_the_plain_search(gen):
    config = SearchConfig.reference().with_(steps=4)
    targets = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    init = initial_state(gen, [10, 11], config)
    plain = search(gen, targets, init, config, execution=Execution(checkpoint="off"))
    ckpt = search(gen, targets, init, config, execution=Execution(checkpoint="on"))
    assert (plain.checkpointed, ckpt.checkpointed) == (False, True)
    assert torch.allclose(plain.hr, ckpt.hr, rtol=0, atol=1e-6)
    assert torch.allclose(plain.latent, ckpt.latent, rtol=0, atol=1e-6)
    assert torch.equal(plain.best_step, ckpt.best_step)


def _saved_bytes(gen: Generator, checkpoint: bool) -> int:
    """Bytes autograd keeps for the backward pass of one synthesis (weights excluded)."""
    weights = {t.data_ptr() for t in [*gen.parameters(), *gen.buffers()]}
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            kept.append(t)
        return t

    start = initial_state(gen, [1, 2, 3, 4], SearchConfig.reference())
    w = gen.prior(start.latent).detach().requires_grad_(True)
    synth = gen.synthesize_checkpointed if checkpoint else gen.synthesize
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        synth(w, start.noise)
    unique = {(t.data_ptr(), tuple(t.shape)): t for t in kept}
    return sum(t.numel() * t.element_size() for t in unique.values())


def test_checkpointing_keeps_far_fewer_activations_for_the_backward_pass():
    gen = _stylegan3()
    assert _saved_bytes(gen, checkpoint=True) < _saved_bytes(gen, checkpoint=False) / 4


def test_auto_checkpoints_only_when_the_plain_path_does_not_fit():
    gen = _stylegan3()
    profile = profile_step(gen)
    assert profile.blocks == 6  # the Fourier input, 4 layers, toRGB
    plain_row, ckpt_row = profile.per_row(False), profile.per_row(True)
    assert ckpt_row < plain_row
    roomy = plan_batch(gen, 8, budget=profile.fixed + 8 * plain_row)
    assert (roomy.batch, roomy.checkpoint) == (8, False)
    tight = plan_batch(gen, 8, budget=profile.fixed + 3 * ckpt_row)
    assert (tight.batch, tight.checkpoint) == (3, True)
    forced = plan_batch(gen, 8, batch=2, checkpoint="off")
    assert (forced.batch, forced.checkpoint, forced.estimate) == (2, False, None)


def test_a_search_that_would_not_fit_switches_checkpointing_on(monkeypatch):
    import pulse_core.memory as memory

    gen = _stylegan3()
    profile = profile_step(gen)
    monkeypatch.setattr(
        memory,
        "available_bytes",
        lambda device: int((profile.fixed + profile.per_row(True)) / 0.75) + 1,
    )
    config = SearchConfig.reference().with_(steps=2)
    targets = torch.rand(1, 3, 4, 4)
    out = search(gen, targets, initial_state(gen, [0], config), config)
    assert out.checkpointed
