"""One cached generator, many searches at once: a search keeps all of its state to itself.

The process cache hands one generator to every thread of a worker (architecture.md, "A loaded
generator is shared and read-only"). The first build's intermediate-layer mode registered forward
hooks on it per search, so two searches running at once added each other's offsets (or failed on
each other's batch sizes). These tests run the robust preset (intermediate offsets on) from two
threads on one generator and demand exactly what the two calls give one after the other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from pulse_core import (
    Generator,
    InitialState,
    SearchConfig,
    SearchResult,
    initial_state,
    preset,
    search,
)
from tests.helpers import tiny_stylegan1
from tests.test_stylegan2 import tiny_stylegan2

STEPS = 12  # robust switches its two split points on at steps 4 and 8 of 12


def _robust() -> SearchConfig:
    return preset("robust").with_(steps=STEPS)


def _small_stylegan2() -> Generator:
    """A random StyleGAN2 (16 px, noise inputs) with its Gaussian fit set before any search."""
    gen = tiny_stylegan2(16, seed=3)
    gen.set_gaussian_fit(gen.compute_gaussian_fit(samples=2000))
    return gen


@pytest.fixture(params=["demo", "stylegan2"])
def shared_generator(request: pytest.FixtureRequest) -> Generator:
    if request.param == "demo":
        return request.getfixturevalue("demo_generator")
    return _small_stylegan2()


def _targets_and_init(gen: Generator, rows: int, seed: int) -> tuple[torch.Tensor, InitialState]:
    """`rows` random LR targets at a quarter of the resolution and their starts."""
    side = gen.resolution // 4
    targets = torch.rand(rows, 3, side, side, generator=torch.Generator().manual_seed(seed))
    return targets, initial_state(gen, [seed * 100 + i for i in range(rows)], _robust())


def _job(gen: Generator, rows: int, seed: int) -> Callable[[], SearchResult]:
    """One robust search of `rows` samples, ready to run."""
    targets, init = _targets_and_init(gen, rows, seed)
    return lambda: search(gen, targets, init, _robust())


def _assert_same(a: SearchResult, b: SearchResult) -> None:
    assert torch.equal(a.hr, b.hr)
    assert torch.equal(a.mse, b.mse)
    assert torch.equal(a.best_step, b.best_step)
    assert torch.equal(a.latent, b.latent)


def test_two_concurrent_searches_on_one_generator_match_running_them_in_turn(shared_generator):
    gen = shared_generator
    jobs = [_job(gen, rows=2, seed=1), _job(gen, rows=3, seed=2)]  # different batch sizes
    in_turn = [job() for job in jobs]

    barrier = threading.Barrier(len(jobs))
    together: list[SearchResult | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            together[i] = jobs[i]()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for alone, concurrent in zip(in_turn, together, strict=True):
        assert concurrent is not None
        _assert_same(alone, concurrent)
    # the offsets were really on: with them off the same search ends elsewhere
    plain = search(
        gen,
        *_targets_and_init(gen, rows=2, seed=1),
        _robust().with_(intermediate_layers=()),
    )
    assert not torch.equal(plain.hr, in_turn[0].hr)


def _snapshot(gen: Generator) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in gen.state_dict(keep_vars=False).items()},
        "attributes": {name: set(m.__dict__) for name, m in gen.named_modules()},
        "hooks": [name for name, m in gen.named_modules() if m._forward_hooks],
        "pre_hooks": [name for name, m in gen.named_modules() if m._forward_pre_hooks],
        "grad": [name for name, p in gen.named_parameters() if p.requires_grad],
    }


@pytest.mark.parametrize("make", [tiny_stylegan1, _small_stylegan2])
def test_a_search_leaves_the_generator_untouched(make):
    gen = make()
    # StyleGAN v1's fast path keeps weight-derived tensors in a per-module cache that any first
    # forward fills (the same values for every caller); warm it so only the search is measured.
    targets, init = _targets_and_init(gen, rows=2, seed=4)
    with torch.no_grad():
        gen.synthesize(gen.prior(init.latent), init.noise)
    before = _snapshot(gen)
    search(gen, targets, init, _robust())
    after = _snapshot(gen)
    assert after["hooks"] == [] and after["pre_hooks"] == []
    assert after["attributes"] == before["attributes"]
    assert after["grad"] == before["grad"] == []
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def test_a_search_leaves_the_demo_generator_untouched(demo_generator):
    targets, init = _targets_and_init(demo_generator, rows=2, seed=5)
    before = _snapshot(demo_generator)
    search(demo_generator, targets, init, _robust())
    after = _snapshot(demo_generator)
    assert after["hooks"] == [] and after["attributes"] == before["attributes"]
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
