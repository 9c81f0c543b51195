"""Forward operators: the reference bicubic taps and the properties every operator must keep."""

import pytest
import torch

from pulse_core.downscale import OPERATORS, bicubic_taps, downscale, keys_cubic
from pulse_core.errors import ConfigError


def test_bicubic_taps_for_factor_2_match_the_reference():
    expected = [-0.0117, -0.0352, 0.1133, 0.4336, 0.4336, 0.1133, -0.0352, -0.0117]
    assert bicubic_taps(2).tolist() == pytest.approx(expected, abs=5e-5)


def test_bicubic_taps_by_hand_for_factor_2():
    # positions (i - 4 + 0.5) / 2 for i = 0..7; Keys kernel a = -0.5, then normalised
    raw = [keys_cubic((i - 4 + 0.5) / 2) for i in range(8)]
    assert raw[3] == pytest.approx(1.5 * 0.25**3 - 2.5 * 0.25**2 + 1)
    assert raw[0] == pytest.approx(-0.5 * 1.75**3 + 2.5 * 1.75**2 - 4 * 1.75 + 2)
    total = sum(raw)
    assert bicubic_taps(2).tolist() == pytest.approx([r / total for r in raw], abs=1e-7)


@pytest.mark.parametrize("factor", [2, 3, 4, 8, 16])
def test_taps_sum_to_one_and_are_symmetric(factor):
    k = bicubic_taps(factor)
    assert k.numel() == 4 * factor
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(k, k.flip(0))


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_constant_image_stays_constant(operator, factor):
    x = torch.full((2, 5, 12 * factor, 12 * factor), 0.37)
    y = downscale(x, factor, operator)
    assert y.shape == (2, 5, 12, 12)
    assert torch.allclose(y, torch.full_like(y, 0.37), atol=1e-6)


def test_operator_is_depthwise_per_channel():
    x = torch.rand(1, 3, 32, 32)
    y = downscale(x, 4)
    for c in range(3):
        assert torch.allclose(downscale(x[:, c : c + 1], 4)[:, 0], y[:, c], atol=1e-6)


def test_bicubic_is_differentiable():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    downscale(x, 4).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_factor_one_is_identity():
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(downscale(x, 1), x)


def test_unknown_operator_names_the_valid_ones():
    with pytest.raises(ConfigError, match="bicubic"):
        downscale(torch.rand(1, 3, 8, 8), 2, "lanczos")


def test_size_not_divisible_by_factor_is_an_error():
    with pytest.raises(ConfigError, match="not divisible"):
        downscale(torch.rand(1, 3, 10, 10), 4)
