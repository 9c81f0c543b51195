"""The loss grammar and each term, checked against hand-computed values."""

import math

import pytest
import torch

from pulse_core.errors import ConfigError
from pulse_core.losses import compute_loss, geocross_per_sample, l2_per_sample, parse_loss


def test_default_loss_parses_with_and_without_spaces():
    a = parse_loss("100*L2+0.05*GEOCROSS")
    b = parse_loss(" 100 * L2 + 0.05 * GEOCROSS ")
    assert a == b and a.terms == ((100.0, "L2"), (0.05, "GEOCROSS"))


def test_bare_term_has_weight_one():
    assert parse_loss("L1").terms == ((1.0, "L1"),)


def test_unknown_term_is_named_in_the_error():
    with pytest.raises(ConfigError, match=r"'LPIPS'.*known terms: L2, L1, GEOCROSS"):
        parse_loss("100*L2+1*LPIPS")


def test_malformed_term_is_an_error():
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_loss("100*L2+*GEOCROSS")


def test_l2_is_clamped_at_eps_per_sample():
    target = torch.zeros(2, 3, 2, 2)
    gen = torch.stack([torch.full((3, 2, 2), 0.5), torch.full((3, 2, 2), 0.01)])
    v = l2_per_sample(gen, target, eps=2e-3)
    assert v.tolist() == pytest.approx([0.25, 2e-3])


def test_geocross_of_two_orthogonal_vectors_by_hand():
    # w_0 = e_0, w_1 = e_1 (D = 2): the pair (0,1) has A = sqrt(2), B = sqrt(2), theta = pi/2.
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    theta_cross = 2 * math.atan2(math.sqrt(2 + 1e-9), math.sqrt(2 + 1e-9))
    theta_self = 2 * math.atan2(math.sqrt(1e-9), math.sqrt(4 + 1e-9))
    expected = (2 * 2 * theta_cross**2 + 2 * 2 * theta_self**2) / 4 / 8
    assert float(geocross_per_sample(w)[0]) == pytest.approx(expected, rel=1e-6)


def test_geocross_is_zero_for_a_tiled_latent_and_a_single_latent():
    w = torch.randn(3, 1, 512)
    assert float(geocross_per_sample(w.expand(-1, 18, -1)).abs().max()) < 1e-6
    assert geocross_per_sample(w).tolist() == [0.0, 0.0, 0.0]


def test_per_sample_values_sum_to_the_batch_total():
    spec = parse_loss("100*L2+0.05*GEOCROSS")
    gen, target, w = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.randn(4, 6, 512)
    values = compute_loss(spec, gen, target, w, 2e-3)
    assert values.total.shape == (4,)
    expected = 100 * values.terms["L2"] + 0.05 * values.terms["GEOCROSS"]
    assert torch.allclose(values.total, expected)
