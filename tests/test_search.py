"""Search behaviour on small random-weight generators (fast, no weights files)."""

import pytest
import torch

from pulse_core.downscale import downscale
from pulse_core.errors import ConfigError
from pulse_core.restore import NOISE_RESAMPLE, RESTART, restore, restore_many
from pulse_core.search import (
    InitialState,
    SearchConfig,
    initial_state,
    search,
    sphere_norm,
    trainable_layers,
    zeroed_layers,
)
from pulse_core.seeds import sample_seed
from tests.helpers import tiny_dcgan, tiny_stylegan1


def _own_sample_lr(gen, seed=7, factor=4):
    init = initial_state(gen, [seed], SearchConfig())
    with torch.no_grad():
        hr = (gen.synthesize(gen.prior(init.latent), init.noise) + 1) / 2
    return downscale(hr, factor)[0].clamp(0, 1)


def test_projection_keeps_latent_and_trainable_noise_on_their_initial_spheres():
    gen = tiny_stylegan1()
    config = SearchConfig(steps=5)
    init = initial_state(gen, [1, 2], config)
    out = search(gen, torch.rand(2, 3, 4, 4), init, config)
    assert torch.allclose(sphere_norm(out.latent), sphere_norm(init.latent), rtol=1e-5)
    for i in trainable_layers(gen, config):
        assert torch.allclose(sphere_norm(out.noise[i]), sphere_norm(init.noise[i]), rtol=1e-5)


def test_noise_modes_choose_zeroed_and_trainable_layers():
    gen = tiny_stylegan1()  # 6 noise inputs
    assert zeroed_layers(gen, SearchConfig()) == {5}
    assert trainable_layers(gen, SearchConfig()) == [0, 1, 2, 3, 4]
    assert trainable_layers(gen, SearchConfig(trainable_noise_layers=2)) == [0, 1]
    assert trainable_layers(gen, SearchConfig(noise_mode="fixed")) == []
    assert zeroed_layers(gen, SearchConfig(noise_mode="zero")) == set(range(6))
    assert trainable_layers(gen, SearchConfig(zeroed_noise_layers=(0, 5))) == [1, 2, 3, 4]


def test_zero_noise_mode_draws_zero_maps_and_fixed_maps_do_not_change():
    gen = tiny_stylegan1()
    init = initial_state(gen, [3], SearchConfig(noise_mode="zero"))
    assert all(float(m.abs().max()) == 0 for m in init.noise)
    config = SearchConfig(noise_mode="fixed", steps=3)
    init = initial_state(gen, [3], config)
    out = search(gen, torch.rand(1, 3, 4, 4), init, config)
    for before, after in zip(init.noise, out.noise, strict=True):
        assert torch.equal(before, after)


def test_tile_latent_optimises_one_vector():
    gen = tiny_stylegan1()
    config = SearchConfig(tile_latent=True, steps=3)
    init = initial_state(gen, [5], config)
    assert init.latent.shape == (1, 1, gen.latent_dim)
    out = search(gen, torch.rand(1, 3, 4, 4), init, config)
    assert float(out.terms["GEOCROSS"][0]) < 1e-4


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "sgdm", "adamax"])
@pytest.mark.parametrize("schedule", ["fixed", "linear1cycle", "linear1cycledrop"])
def test_every_optimiser_and_schedule_runs(optimizer, schedule):
    gen = tiny_stylegan1()
    config = SearchConfig(steps=4, optimizer=optimizer, schedule=schedule)
    out = search(gen, torch.rand(1, 3, 4, 4), initial_state(gen, [0], config), config)
    assert out.history["TOTAL"].shape == (4, 1)
    assert torch.isfinite(out.history["TOTAL"]).all()


def test_history_records_learning_rate_and_each_term_per_step():
    gen = tiny_stylegan1()
    config = SearchConfig(steps=10)
    out = search(gen, torch.rand(3, 3, 4, 4), initial_state(gen, [0, 1, 2], config), config)
    assert set(out.history) == {"lr", "MSE", "L2", "GEOCROSS", "TOTAL"}
    assert out.history["lr"][0, 0] == pytest.approx(0.04)
    assert out.history["L2"].shape == (10, 3)


def test_batched_rows_optimise_independently():
    gen = tiny_stylegan1()
    config = SearchConfig(steps=6)
    targets = torch.rand(3, 3, 4, 4)
    init = initial_state(gen, [10, 11, 12], config)
    together = search(gen, targets, init, config)
    alone = search(gen, targets[1:2], init.select([1]), config)
    assert torch.allclose(together.history["TOTAL"][:, 1], alone.history["TOTAL"][:, 0], rtol=1e-4)


def test_best_iterate_is_chosen_per_sample_and_hr_matches_its_lr_preview():
    gen = tiny_stylegan1()
    config = SearchConfig(steps=15)
    targets = torch.stack([_own_sample_lr(gen, 1), torch.rand(3, 4, 4)])
    out = search(gen, targets, initial_state(gen, [20, 21], config), config)
    for row in range(2):
        step = int(out.best_step[row])
        assert out.mse[row] == pytest.approx(float(out.history["MSE"][step, row]), rel=1e-6)
        # the LR preview is the downscale of the same iterate's HR image
        assert torch.allclose(downscale(out.hr[row : row + 1], 4)[0], out.lr[row], atol=1e-5)


def test_sample_that_never_reaches_eps_is_returned_flagged_with_losses():
    gen = tiny_dcgan()
    config = SearchConfig(steps=3, eps=1e-9)
    result = restore(torch.rand(3, 16, 16), gen, samples=2, config=config)
    assert [s.converged for s in result.samples] == [False, False]
    assert all(
        s.mse > 0 and s.terms["TOTAL"] > 0 and s.hr.shape == (3, 64, 64) for s in result.samples
    )


def test_early_stop_ends_the_batch_once_every_sample_converged():
    gen = tiny_dcgan()
    lr = _own_sample_lr(gen, 3, factor=8)
    config = SearchConfig(steps=200, eps=5e-3, early_stop=True, loss="100*L2")
    result = restore(lr, gen, samples=2, config=config)
    assert all(s.converged for s in result.samples)
    assert result.samples[0].steps_run < 200


def test_samples_of_one_input_differ_and_have_distinct_recorded_seeds():
    gen = tiny_stylegan1()
    result = restore(torch.rand(3, 4, 4), gen, samples=3, config=SearchConfig(steps=3))
    seeds = [s.seed for s in result.samples]
    assert len(set(seeds)) == 3
    assert not torch.equal(result.samples[0].hr, result.samples[1].hr)


def test_same_seed_reproduces_the_same_result_bit_for_bit():
    gen = tiny_stylegan1()
    lr = torch.rand(3, 4, 4)
    a = restore(lr, gen, samples=2, seed=42, config=SearchConfig(steps=5))
    b = restore(lr, gen, samples=2, seed=42, config=SearchConfig(steps=5))
    c = restore(lr, gen, samples=2, seed=43, config=SearchConfig(steps=5))
    assert all(torch.equal(x.hr, y.hr) for x, y in zip(a.samples, b.samples, strict=True))
    assert not torch.equal(a.samples[0].hr, c.samples[0].hr)


def test_seed_zero_is_a_real_seed_and_seeds_depend_on_input_and_index():
    assert sample_seed(0, "a.png", 0) != sample_seed(0, "a.png", 1)
    assert sample_seed(0, "a.png", 0) != sample_seed(0, "b.png", 0)
    assert sample_seed(0, "a.png", 0) != sample_seed(1, "a.png", 0)


def test_explicit_initial_state_reproduces_a_run():
    gen = tiny_stylegan1()
    config = SearchConfig(steps=4)
    init = initial_state(gen, [99], config)
    target = torch.rand(1, 3, 4, 4)
    a = search(
        gen, target, InitialState(init.latent.clone(), [m.clone() for m in init.noise]), config
    )
    b = search(gen, target, init, config)
    assert torch.equal(a.hr, b.hr)


def test_noise_resampling_keeps_the_parent_latent_and_records_how_samples_were_made():
    gen = tiny_stylegan1()
    result = restore(
        torch.rand(3, 4, 4),
        gen,
        samples=3,
        resample=2,
        config=SearchConfig(steps=5),
        resample_steps=3,
    )
    methods = [s.method for s in result.samples]
    assert methods == [RESTART, NOISE_RESAMPLE, NOISE_RESAMPLE]
    assert [s.parent for s in result.samples] == [None, 0, 0]
    assert not torch.equal(result.samples[1].hr, result.samples[2].hr)
    assert not torch.equal(result.samples[1].noise[0], result.samples[0].noise[0])


def test_noise_resampling_needs_noise_inputs():
    with pytest.raises(ConfigError, match="no noise inputs"):
        restore(torch.rand(3, 16, 16), tiny_dcgan(), samples=2, resample=1)


def test_restore_many_batches_inputs_of_different_sizes():
    gen = tiny_stylegan1()
    results = restore_many(
        [torch.rand(3, 4, 4), torch.rand(3, 8, 8)],
        gen,
        samples=2,
        keys=["a", "b"],
        config=SearchConfig(steps=2),
        search_batch=3,
    )
    assert [r.factor for r in results] == [4, 2]
    assert [len(r.samples) for r in results] == [2, 2]


def test_lr_size_that_does_not_divide_the_resolution_is_refused():
    from pulse_core.errors import InputError

    with pytest.raises(InputError, match="divide"):
        restore(torch.rand(3, 5, 5), tiny_stylegan1(), samples=1)


def test_config_validation_names_valid_choices():
    with pytest.raises(ConfigError, match="trainable"):
        SearchConfig(noise_mode="random")
    with pytest.raises(ConfigError, match="area"):
        SearchConfig(operator="lanczos")


def test_search_runs_on_cuda_when_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    gen = tiny_stylegan1().to("cuda")
    result = restore(torch.rand(3, 4, 4), gen, samples=2, config=SearchConfig(steps=3))
    assert result.samples[0].hr.device.type == "cpu"
