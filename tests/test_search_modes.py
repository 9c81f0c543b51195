"""Early stop per sample, restarts under a step budget, and the intermediate-layer mode."""

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pulse_core import SearchConfig, downscale, restore
from pulse_core.errors import ConfigError
from pulse_core.imaging import load_image, prepare_input
from pulse_core.layers import FeatureOffsets, auto_layers
from pulse_core.search import initial_state, search
from tests.helpers import tiny_dcgan, tiny_stylegan1

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"


def _own_lr(gen, seed: int, factor: int) -> torch.Tensor:
    init = initial_state(gen, [seed], SearchConfig())
    with torch.no_grad():
        hr = (gen.synthesize(gen.prior(init.latent), init.noise) + 1) / 2
    return downscale(hr, factor)[0].clamp(0, 1)


def test_converged_sample_is_frozen_while_the_others_go_on():
    gen = tiny_dcgan()
    easy = _own_lr(gen, 3, 8)
    targets = torch.stack([easy, torch.rand(3, 8, 8)])
    config = SearchConfig(steps=80, eps=5e-3, early_stop=True, loss="100*L2")
    init = initial_state(gen, [3, 4], config)
    init.latent[0] = init.latent[0] * 0 + initial_state(gen, [3], config).latent[0]
    out = search(gen, targets, init, config)
    assert bool(out.converged[0]) and not bool(out.converged[1])
    assert int(out.row_steps[0]) < out.steps_run == 80 == int(out.row_steps[1])
    # after freezing, the converged row's recorded losses stay put
    frozen_from = int(out.row_steps[0])
    tail = out.history["MSE"][frozen_from:, 0]
    assert torch.allclose(tail, tail[0].expand_as(tail))


def test_batch_stops_once_every_sample_is_frozen():
    gen = tiny_dcgan()
    lr = _own_lr(gen, 5, 8)
    result = restore(lr, gen, samples=2, config=SearchConfig(steps=300, eps=5e-3, early_stop=True))
    assert all(s.converged for s in result.samples)
    assert max(s.steps_run for s in result.samples) < 300


def test_inputs_that_fail_get_more_restarts_within_their_restart_budget():
    gen = tiny_stylegan1()
    # unreachable eps: all fail; 2.5 rounds of 2 restarts x 5 steps = 25 steps
    config = SearchConfig(steps=5, eps=1e-9, early_stop=True, restart_budget=2.5)
    result = restore(torch.rand(3, 4, 4), gen, samples=2, config=config)
    assert len(result.samples) == 2 and all(s.selected for s in result.samples)
    assert len(result.attempts) == 5  # 2 + 2 + 1 restarts of 5 steps fit in 25 steps
    assert result.steps_spent <= 25
    assert [s.index for s in result.samples] == [0, 1]
    assert sorted(s.index for s in result.extra_attempts) == [2, 3, 4]
    assert not any(s.selected for s in result.extra_attempts)
    assert len({s.seed for s in result.attempts}) == 5
    # the returned samples are the best attempts
    worst_returned = max(s.mse for s in result.samples)
    assert all(s.mse >= worst_returned for s in result.extra_attempts)


def test_inputs_that_converge_get_no_extra_restarts():
    gen = tiny_dcgan()
    lr = _own_lr(gen, 5, 8)
    config = SearchConfig(steps=300, eps=5e-3, early_stop=True, restart_budget=3)
    result = restore(lr, gen, samples=2, config=config)
    assert result.converged_count == 2 and result.extra_attempts == []


def test_restart_budget_in_rounds_sets_the_step_budget():
    gen = tiny_stylegan1()
    config = SearchConfig(steps=4, eps=1e-9, restart_budget=2)
    result = restore(torch.rand(3, 4, 4), gen, samples=1, config=config)
    assert len(result.attempts) == 2 and result.steps_spent == 8


def test_each_restart_round_widens_the_intermediate_ball():
    gen = tiny_dcgan()
    config = SearchConfig(
        steps=3,
        eps=1e-9,  # unreachable: every round runs
        intermediate_layers=("16x16",),
        intermediate_radius=0.04,
        restart_budget=3,
        restart_radius_growth=1.5,
    )
    result = restore(torch.rand(3, 8, 8), gen, samples=1, config=config)
    radii = sorted((s.attempt, s.intermediate_radius) for s in result.attempts)
    assert [a for a, _ in radii] == [0, 1, 2]
    assert [r for _, r in radii] == pytest.approx([0.04, 0.06, 0.09])
    same = restore(
        torch.rand(3, 8, 8), gen, samples=1, config=config.with_(restart_radius_growth=1)
    )
    assert {s.intermediate_radius for s in same.attempts} == {0.04}


def test_the_robust_preset_widens_the_ball_for_its_restart_round():
    from pulse_core.search import preset

    robust = preset("robust")
    assert (robust.restart_budget, robust.restart_radius_growth) == (2.0, 1.5)
    with pytest.raises(ConfigError, match="restart_radius_growth must be >= 1"):
        robust.with_(restart_radius_growth=0.5)


def test_restart_budget_below_one_round_is_refused():
    with pytest.raises(ConfigError, match="restart_budget must be >= 1"):
        SearchConfig(steps=5, restart_budget=0.5)


def test_offsets_stay_inside_their_ball_relative_to_the_feature_norm():
    gen = tiny_dcgan()
    offsets = FeatureOffsets(gen, ("16x16",), radius=0.1, steps=10, start_fraction=0.0)
    z = torch.randn(2, 1, 16)
    offsets.switch_on(0)
    with torch.no_grad():
        gen.synthesize(z, [], edit=offsets)
    off = offsets.offsets[0]
    assert off.delta is not None and off.delta.shape[0] == 2
    with torch.no_grad():
        off.delta.normal_(0, 10.0)  # far outside the ball
    offsets.project()
    assert torch.all(off.offset_norm() <= 0.1 + 1e-5)
    features = {}

    def spy(name: str, x: torch.Tensor) -> torch.Tensor:  # sees 16x16 after the offset
        x = offsets(name, x)
        if name == "16x16":
            features["x"] = x
        return x

    with torch.no_grad():
        gen.synthesize(z, [], edit=spy)
    off_abs = (off.delta * off.scale).reshape(2, -1).norm(dim=1)
    clean = features["x"] - off.delta * off.scale
    assert torch.all(off_abs <= 0.1 * clean.reshape(2, -1).norm(dim=1) * 1.001)


def test_offsets_change_only_the_call_they_are_passed_to():
    gen = tiny_dcgan()
    offsets = FeatureOffsets(gen, ("16x16",), radius=0.1, steps=10, start_fraction=0.0)
    z = torch.randn(2, 1, 16)
    offsets.switch_on(0)
    with torch.no_grad():
        plain = gen.synthesize(z, [])
        gen.synthesize(z, [], edit=offsets)  # creates the delta
        offsets.offsets[0].delta.normal_(0, 1.0)
        edited = gen.synthesize(z, [], edit=offsets)
        again = gen.synthesize(z, [])
    assert not torch.equal(edited, plain)
    assert torch.equal(again, plain)


def test_search_leaves_no_hooks_on_the_generator():
    gen = tiny_dcgan()
    config = SearchConfig(steps=4, intermediate_layers=("16x16",), intermediate_start=0.0)
    search(gen, torch.rand(1, 3, 8, 8), initial_state(gen, [0], config), config)
    assert all(not m._forward_hooks for m in gen.modules())


def test_layers_are_switched_on_progressively():
    gen = tiny_dcgan()
    offsets = FeatureOffsets(gen, ("8x8", "16x16"), radius=0.2, steps=90, start_fraction=1 / 3)
    assert offsets.enable_at == [30, 60]


def test_unknown_split_point_lists_the_known_ones():
    gen = tiny_dcgan()
    config = SearchConfig(steps=2, intermediate_layers=("64x64",))
    with pytest.raises(ConfigError, match="4x4, 8x8, 16x16, 32x32"):
        search(gen, torch.rand(1, 3, 8, 8), initial_state(gen, [0], config), config)


def test_auto_picks_the_split_points_at_an_eighth_and_a_quarter_of_the_resolution():
    assert auto_layers(tiny_dcgan()) == ("8x8", "16x16")
    assert auto_layers(tiny_stylegan1(64)) == ("8x8", "16x16")


def test_split_points_carry_their_sides_coarse_to_fine():
    assert tiny_dcgan().feature_layers() == {"4x4": 4, "8x8": 8, "16x16": 16, "32x32": 32}
    assert tiny_stylegan1(16).feature_layers() == {"4x4": 4, "8x8": 8, "16x16": 16}


@pytest.mark.parametrize("make", [tiny_stylegan1, tiny_dcgan])
def test_intermediate_mode_runs_on_each_family_and_records_radius_and_layers(make):
    gen = make()
    size = 4 if gen.resolution == 16 else 16
    config = SearchConfig(steps=6, intermediate_layers=("auto",), intermediate_radius=0.15)
    result = restore(torch.rand(3, size, size), gen, samples=1, config=config)
    s = result.samples[0]
    assert s.intermediate_layers == ("auto",) and s.intermediate_radius == 0.15


def test_intermediate_mode_restores_a_real_photo_that_plain_pulse_cannot(demo_generator):
    lr = prepare_input(load_image(EXAMPLES / "astronaut-16.png"), 64).tensor
    plain = restore(lr, demo_generator, samples=2, config=SearchConfig.reference())
    ilo = restore(
        lr,
        demo_generator,
        samples=2,
        config=SearchConfig(
            steps=150, early_stop=True, intermediate_layers=("auto",), intermediate_radius=0.1
        ),
    )
    assert plain.converged_count == 0
    assert ilo.converged_count == 2


def test_cli_and_flow_default_to_the_evaluated_robust_preset():
    import inspect

    from flows.restore import restore_archive
    from pulse_cli.main import build_parser
    from pulse_core.search import DEFAULT_PRESET, preset
    from pulse_core.settings import RestoreSettings

    assert DEFAULT_PRESET == "robust"
    robust = preset("robust")
    assert robust.intermediate_layers == ("auto",) and robust.intermediate_radius == 0.05
    assert robust.early_stop and robust.steps == 150 and robust.restart_budget == 2
    args = build_parser().parse_args(["upsample", "x.png", "--out", "o"])
    assert args.preset == "robust"
    assert RestoreSettings().preset == "robust"
    default = inspect.signature(restore_archive.fn).parameters["settings"].default
    assert default.preset == "robust" and default.config == robust


def test_reference_preset_has_every_new_mode_off():
    ref = SearchConfig.reference()
    assert ref.intermediate_layers == () and not ref.early_stop and ref.restart_budget == 1


def test_batch_records_every_attempt_in_the_manifest(demo_generator, tmp_path):
    import shutil

    from pulse_core.manifest import read_manifest
    from pulse_core.pipeline import process_batch
    from pulse_core.settings import RestoreSettings
    from pulse_core.storage import open_storage

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(EXAMPLES / "grace-hopper-16.png", src / "g.png")
    dest = open_storage(str(tmp_path / "dest"))
    dest.check(create=True)
    search = SearchConfig(
        steps=5, eps=1e-9, restart_budget=3, intermediate_layers=("16x16",), intermediate_radius=0.2
    )
    settings = RestoreSettings(samples=1, search=search)
    process_batch(["g.png"], open_storage(str(src)), dest, settings, run_id="r", batch_id="0")
    rows = read_manifest(dest, "_runs/r/parts/samples-0.parquet").to_pylist()
    assert len(rows) == 3
    assert [r["selected"] for r in sorted(rows, key=lambda r: r["sample_index"])] == [
        True,
        False,
        False,
    ]
    assert {r["attempt"] for r in rows} == {0, 1, 2}
    assert all(
        r["intermediate_layers"] == ["16x16"] and r["intermediate_radius"] == 0.2 for r in rows
    )
    assert sum(r["output_key"] is not None for r in rows) == 1


def test_version_1_index_parts_read_with_the_new_columns_filled(tmp_path):
    from pulse_core.manifest import SAMPLES_SCHEMA, _conform

    v1 = [
        f
        for f in SAMPLES_SCHEMA
        if f.name not in ("attempt", "selected", "intermediate_layers", "intermediate_radius")
    ]
    row = {f.name: None for f in v1}
    row.update(
        schema_version=1,
        run_id="old",
        input_key="a.png",
        conversions=[],
        generator_id="demo",
        seed=1,
        sample_index=0,
        method="restart",
        converged=True,
        eps=2e-3,
        status="ok",
        created_at=pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py(),
    )
    table = _conform(pa.Table.from_pylist([row], schema=pa.schema(v1)), "old part")
    got = table.to_pylist()[0]
    assert got["attempt"] == 0 and got["selected"] is True
    assert got["intermediate_layers"] == [] and got["intermediate_radius"] is None
