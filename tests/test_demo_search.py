"""PULSE on the real demo generator (the DCGAN face model from the package registry)."""

import torch

from pulse_core import SearchConfig, restore
from pulse_core.downscale import downscale
from pulse_core.search import initial_state


def _own_sample(gen, seed: int) -> torch.Tensor:
    init = initial_state(gen, [seed], SearchConfig())
    with torch.no_grad():
        return ((gen.synthesize(gen.prior(init.latent), []) + 1) / 2).clamp(0, 1)


def test_demo_generator_is_the_pinned_dcgan(demo_generator):
    assert demo_generator.family == "dcgan" and demo_generator.resolution == 64
    assert (
        demo_generator.checksum
        == "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"
    )
    assert demo_generator.noise_shapes == () and demo_generator.num_latents == 1


def test_search_reaches_eps_for_a_downscaled_sample_of_its_own(demo_generator):
    # 8x8 from 64x64 (factor 8) with the paper's settings: 100 steps, lr 0.4, eps 2e-3
    lr = downscale(_own_sample(demo_generator, 2020), 8)[0]
    result = restore(lr, demo_generator, samples=4, seed=1, config=SearchConfig.reference())
    assert result.converged_count >= 1, [s.mse for s in result.samples]
    for s in result.samples:
        assert s.converged == (s.mse <= 2e-3)
        # the returned LR check is the downscale of the returned HR image (same iterate)
        assert torch.allclose(downscale(s.hr[None], 8)[0], s.lr, atol=2e-3)


def test_samples_of_one_input_differ(demo_generator):
    lr = downscale(_own_sample(demo_generator, 7), 8)[0]
    result = restore(lr, demo_generator, samples=3, config=SearchConfig(steps=30))
    hrs = [s.hr for s in result.samples]
    assert all(float((a - b).abs().mean()) > 1e-3 for i, a in enumerate(hrs) for b in hrs[i + 1 :])


def test_same_seed_gives_a_bit_identical_result(demo_generator):
    lr = downscale(_own_sample(demo_generator, 3), 4)[0]
    a = restore(lr, demo_generator, samples=2, seed=5, config=SearchConfig(steps=20))
    b = restore(lr, demo_generator, samples=2, seed=5, config=SearchConfig(steps=20))
    for x, y in zip(a.samples, b.samples, strict=True):
        assert x.seed == y.seed
        assert torch.equal(x.hr, y.hr) and x.history == y.history


def test_restore_accepts_a_pil_image(demo_generator):
    from pulse_core.imaging import to_pil

    lr = downscale(_own_sample(demo_generator, 4), 4)[0].clamp(0, 1)
    result = restore(to_pil(lr), demo_generator, samples=1, config=SearchConfig(steps=5))
    assert result.samples[0].hr.shape == (3, 64, 64)
