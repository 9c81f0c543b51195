"""Learning-rate schedules and optimisers of the search."""

import pytest
import torch

from pulse_core.errors import ConfigError
from pulse_core.schedules import lr_factor, make_optimizer


@pytest.mark.parametrize(
    ("step", "lr"), [(0, 0.04), (45, 0.4), (90, 0.04), (99, 0.4 * (0.1 + 0.9 * (0.001 - 0.1)))]
)
def test_linear1cycledrop_at_the_documented_steps_of_100(step, lr):
    assert 0.4 * lr_factor("linear1cycledrop", step, 100) == pytest.approx(lr, abs=1e-9)


def test_linear1cycledrop_step_99_is_about_0_0044():
    assert 0.4 * lr_factor("linear1cycledrop", 99, 100) == pytest.approx(0.00436, abs=1e-6)


def test_linear1cycle_peaks_at_the_middle():
    assert lr_factor("linear1cycle", 50, 100) == pytest.approx(1.0)
    assert lr_factor("linear1cycle", 0, 100) == pytest.approx(0.1)


def test_fixed_is_one_everywhere():
    assert {lr_factor("fixed", s, 10) for s in range(10)} == {1.0}


def test_twenty_step_schedule_peaks_at_step_9():
    lrs = [lr_factor("linear1cycledrop", s, 20) for s in range(20)]
    assert max(range(20), key=lrs.__getitem__) == 9


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adam", torch.optim.Adam),
        ("sgd", torch.optim.SGD),
        ("sgdm", torch.optim.SGD),
        ("adamax", torch.optim.Adamax),
    ],
)
def test_optimisers_by_name(name, cls):
    opt = make_optimizer(name, [torch.zeros(2, requires_grad=True)], 0.1)
    assert isinstance(opt, cls)
    if name == "sgdm":
        assert opt.param_groups[0]["momentum"] == 0.9


def test_unknown_schedule_and_optimiser_are_errors():
    with pytest.raises(ConfigError, match="linear1cycledrop"):
        lr_factor("cosine", 0, 10)
    with pytest.raises(ConfigError, match="adamax"):
        make_optimizer("lbfgs", [torch.zeros(1, requires_grad=True)], 0.1)
