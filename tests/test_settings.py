"""One typed contract: RestoreSettings (with its SearchConfig) and PipelineOptions.

Every field must reach every entry point (`pulse run`, `pulse upsample`, the flow's typed
parameters and its deployment form) from its one declaration, and be checked once, when built.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import TypeAdapter, ValidationError

from flows.restore import restore_archive
from pulse_cli.main import build_parser
from pulse_cli.options import flag, pipeline_from_args, settings_from_args
from pulse_core.errors import ConfigError
from pulse_core.search import SearchConfig, preset
from pulse_core.settings import PipelineOptions, RestoreSettings, build_settings

# Values that differ from every preset's and are valid, per field.
SEARCH_VALUES: dict[str, Any] = {
    "steps": 7,
    "learning_rate": 0.123,
    "optimizer": "adamax",
    "schedule": "fixed",
    "loss": "100*L2",
    "eps": 0.0123,
    "operator": "area",
    "noise_mode": "fixed",
    "trainable_noise_layers": 3,
    "zeroed_noise_layers": (0, -2),
    "tile_latent": True,
    "early_stop": False,
    "intermediate_layers": ("16x16", "32x32"),
    "intermediate_radius": 0.123,
    "intermediate_start": 0.5,
    "restart_budget": 1.5,
    "restart_radius_growth": 1.25,
}
SETTINGS_VALUES: dict[str, Any] = {
    "model": "some/model.pt",
    "samples": 3,
    "resample": 1,
    "preset": "fast",
    "seed": 11,
    "fit": "pad",
    "device": "cpu",
    "search_batch": 5,
    "precision": "bf16",
    "checkpoint": "on",
    "compile": True,
    "max_pixels": 1000,
    "faces": "paste",
    "upscale": 3,
    "min_face_size": 12.5,
    "face_recipe": "ffhq",
}
OPTIONS_VALUES: dict[str, Any] = {
    "inputs_per_task": 3,
    "task_runner": "dask",
    "max_workers": 2,
    "dask_address": "tcp://127.0.0.1:8786",
    "gpu_resource": False,
    "limit": 9,
    "force": True,
    "max_failures": 4,
    "storage_endpoint": "http://127.0.0.1:8333",
}


def _argv(values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, tuple):
            argv += [flag(name), ",".join(str(v) for v in value)]
        else:
            argv += [flag(name), str(value)]
    return argv


def test_the_value_tables_cover_every_field():
    assert set(SEARCH_VALUES) == {f.name for f in fields(SearchConfig)}
    assert set(SETTINGS_VALUES) == {f.name for f in fields(RestoreSettings)} - {"search"}
    assert set(OPTIONS_VALUES) == {f.name for f in fields(PipelineOptions)}
    base = preset(SETTINGS_VALUES["preset"])  # every value must change the preset's
    for name, value in SEARCH_VALUES.items():
        assert getattr(base, name) != value, name


@pytest.mark.parametrize("command", ["run", "upsample"])
def test_every_search_and_settings_field_is_reachable_from_the_cli(command):
    where = ["run", "src", "dest"] if command == "run" else ["upsample", "x.png", "--out", "o"]
    args = build_parser().parse_args([*where, *_argv(SEARCH_VALUES), *_argv(SETTINGS_VALUES)])

    settings = settings_from_args(args)

    assert settings.search == SearchConfig(**SEARCH_VALUES)
    for name, value in SETTINGS_VALUES.items():
        assert getattr(settings, name) == value, name


def test_every_pipeline_option_is_reachable_from_pulse_run():
    args = build_parser().parse_args(["run", "src", "dest", *_argv(OPTIONS_VALUES)])
    assert pipeline_from_args(args) == PipelineOptions(**OPTIONS_VALUES)


def test_cli_search_options_keep_the_preset_unless_given():
    args = build_parser().parse_args(["run", "s", "d", "--preset", "reference", "--steps", "9"])
    assert settings_from_args(args).search == SearchConfig(steps=9)
    args = build_parser().parse_args(["upsample", "x.png", "--out", "o"])
    assert settings_from_args(args).search == preset("robust")


def test_every_field_reaches_the_flow_as_a_typed_parameter():
    """What the Prefect UI or a deployment sends (JSON) validates into the same objects."""
    payload = {
        "settings": {**SETTINGS_VALUES, "search": {**SEARCH_VALUES}},
        "options": dict(OPTIONS_VALUES),
    }
    model = restore_archive.parameters  # the schema Prefect stores with the deployment
    assert {"source", "dest", "settings", "options"} <= set(model.properties)
    settings = TypeAdapter(RestoreSettings).validate_python(payload["settings"])
    options = TypeAdapter(PipelineOptions).validate_python(payload["options"])
    assert settings.search == SearchConfig(**SEARCH_VALUES)
    assert settings == RestoreSettings(**{**SETTINGS_VALUES, "search": settings.search})
    assert options == PipelineOptions(**OPTIONS_VALUES)


def test_the_deployment_form_describes_every_field_and_offers_choices_as_dropdowns():
    schema = restore_archive.parameters.model_dump()
    definitions = schema["definitions"]
    for cls in (SearchConfig, RestoreSettings, PipelineOptions):
        props = definitions[cls.__name__]["properties"]
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            assert props[f.name].get("description"), f"{cls.__name__}.{f.name} has no description"
            if get_origin(hints[f.name]) is Literal:
                assert props[f.name]["enum"] == list(get_args(hints[f.name])), f.name
    settings = definitions["RestoreSettings"]["properties"]
    for name in ("preset", "fit", "device"):
        assert "enum" in settings[name], name
    assert "enum" in definitions["PipelineOptions"]["properties"]["task_runner"]
    assert "enum" in definitions["SearchConfig"]["properties"]["operator"]


def test_every_field_has_one_description_shared_by_cli_help_and_form():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    helps = {a.dest: a.help for a in run._actions}
    for cls in (SearchConfig, RestoreSettings, PipelineOptions):
        for f in fields(cls):
            if f.name == "search":
                continue
            assert f.default is not MISSING
            assert f.metadata["description"] in helps[f.name].replace("%%", "%"), f.name


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SearchConfig(steps=0), "steps must be >= 1"),
        (lambda: SearchConfig(operator="lanczos"), "unknown forward operator"),
        (lambda: RestoreSettings(samples=2, resample=2), "resample must be between"),
        (lambda: RestoreSettings(device="tpu"), "unknown device"),
        (lambda: RestoreSettings(preset="paper"), "unknown preset"),
        (lambda: PipelineOptions(inputs_per_task=0), "inputs_per_task"),
        (lambda: build_settings("reference", {"eps": -1.0}), "eps must be > 0"),
    ],
)
def test_bad_values_fail_when_the_settings_are_built(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_bad_values_from_the_form_fail_validation_with_the_reason():
    with pytest.raises(ValidationError, match="steps must be >= 1"):
        TypeAdapter(RestoreSettings).validate_python({"search": {"steps": 0}})
    with pytest.raises(ValidationError):
        TypeAdapter(RestoreSettings).validate_python({"fit": "stretch"})


def test_bad_cli_values_exit_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["run", "s", "d", "--operator", "lanczos"])
    assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_resolved_settings_hold_the_effective_search():
    settings = RestoreSettings(preset="fast")
    assert settings.search is None and settings.config == preset("fast")
    assert settings.resolved().search == preset("fast")
    custom = build_settings("reference", {"steps": 3}, samples=2)
    assert custom.resolved() is custom and custom.search == SearchConfig(steps=3)


def test_docs_settings_reference_is_generated_from_the_dataclasses():
    """docs/ and --help say the same: the reference is regenerated, never hand-edited."""
    from pathlib import Path

    from pulse_cli.options import markdown_reference

    docs = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
    assert docs.read_text() == markdown_reference(), (
        "docs/settings.md is stale: run `pulse settings --markdown > docs/settings.md`"
    )


def test_pulse_settings_json_is_what_the_flow_parameter_takes(capsys):
    import json

    from pulse_cli.main import main

    assert main(["settings", "--preset", "reference", "--steps", "5", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    settings = TypeAdapter(RestoreSettings).validate_python(shown)
    assert settings.search == SearchConfig(steps=5) and settings.preset == "reference"
