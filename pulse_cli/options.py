"""argparse options generated from the settings dataclasses, shared by every command.

Each field of `SearchConfig`, `RestoreSettings` and `PipelineOptions` becomes `--kebab-name`
with its type, its `Literal` choices and the field's own description as help. A new option is
one new dataclass field: `pulse upsample`, `pulse run` and the flow all get it from there.

Search options default to "keep the preset's" (None here); `settings_from_args` resolves the
preset and the overrides once, through `pulse_core.settings.build_settings`.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, fields
from typing import Any, Literal, get_args, get_origin

from pulse_core.search import SearchConfig, preset
from pulse_core.settings import PipelineOptions, RestoreSettings, build_settings

# RestoreSettings fields that are not plain options: `search` is built from the search group.
_NOT_OPTIONS = {"search"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The restore settings (model, samples, preset, ...) and every search option."""
    g = parser.add_argument_group("restore settings")
    for f in fields(RestoreSettings):
        if f.name not in _NOT_OPTIONS:
            _add_field(g, f, _hints(RestoreSettings)[f.name], keep_default=True)
    reference = SearchConfig()
    robust = preset("robust")
    s = parser.add_argument_group(
        "search (each defaults to the preset's value: shown as reference / robust)"
    )
    for f in fields(SearchConfig):
        shown = f"{getattr(reference, f.name)!r} / {getattr(robust, f.name)!r}"
        _add_field(s, f, _hints(SearchConfig)[f.name], keep_default=False, preset_values=shown)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """How a run executes (fan-out, limits, failure policy): `pulse run` only."""
    g = parser.add_argument_group("pipeline")
    for f in fields(PipelineOptions):
        _add_field(g, f, _hints(PipelineOptions)[f.name], keep_default=True)


def settings_from_args(args: argparse.Namespace) -> RestoreSettings:
    """The RestoreSettings the command line describes (preset and overrides resolved)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(SearchConfig)}
    others = {
        f.name: getattr(args, f.name)
        for f in fields(RestoreSettings)
        if f.name not in _NOT_OPTIONS and f.name != "preset"
    }
    return build_settings(args.preset, overrides, **others)


def pipeline_from_args(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(**{f.name: getattr(args, f.name) for f in fields(PipelineOptions)})


# ----------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _add_field(
    group: argparse._ArgumentGroup,
    f: Field[Any],
    hint: Any,
    *,
    keep_default: bool,
    preset_values: str | None = None,
) -> None:
    """One dataclass field as one option: type, choices, default and help from the field."""
    description = f.metadata.get("description", f.name.replace("_", " "))
    default = f.default if keep_default and f.default is not MISSING else None
    kwargs: dict[str, Any] = {"dest": f.name, "default": default}
    base = _unwrap_optional(hint)
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(base) is Literal:
        kwargs["choices"] = list(get_args(base))
        kwargs["metavar"] = "{" + ",".join(str(c) for c in get_args(base)) + "}"
    elif get_origin(base) is tuple:
        item = get_args(base)[0]
        kwargs["type"] = _list_parser(item, f.name)
        kwargs["metavar"] = "A,B,..|none"
    else:
        kwargs["type"] = base
    if preset_values is not None:
        help_text = f"{description} (preset: {preset_values})"
    elif default is not None:
        help_text = f"{description} (default: {default})"
    else:
        help_text = description
    kwargs["help"] = help_text.replace("%", "%%")
    group.add_argument(flag(f.name), **kwargs)


def _unwrap_optional(hint: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _list_parser(item: type, name: str) -> Any:
    """'a,b' -> ('a', 'b'); 'none' or '' -> () (for example: plain PULSE, no layers)."""

    def parse(text: str) -> tuple[Any, ...]:
        text = text.strip()
        if text.lower() in ("none", "off", ""):
            return ()
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}: expected a comma-separated list of {item.__name__}, got {text!r}"
            ) from None

    parse.__name__ = f"list of {item.__name__}"
    return parse


# ----------------------------------------------------------------------------
# `pulse settings`: the effective settings, and the reference table of every option


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "settings",
        help="show the effective settings for a preset and options (or the option reference)",
        description="Resolve a preset and any options into the settings a run would use, as "
        "`pulse run` and `pulse upsample` would: shown as a table, as JSON (--json, the shape "
        "the flow's `settings` parameter takes) or, with --markdown, the reference of every "
        "option (docs/settings.md is generated from it).",
    )
    add_settings_arguments(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the settings as JSON")
    out.add_argument(
        "--markdown", action="store_true", help="print the reference of every option (markdown)"
    )
    p.set_defaults(func=show_settings)


def show_settings(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    if args.markdown:
        print(markdown_reference(), end="")
        return 0
    settings = settings_from_args(args).resolved()
    if args.json:
        print(json.dumps(asdict(settings), indent=2))
        return 0
    for name, value in asdict(settings).items():
        if name != "search":
            print(f"{name:24} {value!r}")
    for name, value in asdict(settings.config).items():
        print(f"search.{name:17} {value!r}")
    return 0


def markdown_reference() -> str:
    """Every option of every settings dataclass: flag, field, default, description."""
    robust = preset("robust")
    lines = [
        "# Settings reference",
        "",
        "Generated from the settings dataclasses by `pulse settings --markdown` (a test keeps",
        "this file equal to its output). Each option is one dataclass field: the same name in",
        "the flow's typed parameters (`settings`, `settings.search`, `options`), in the",
        "Prefect deployment form and, as `--kebab-case`, on the command line.",
        "",
    ]
    groups = [
        ("RestoreSettings", "`settings` (`pulse run`, `pulse upsample`)", RestoreSettings, None),
        (
            "SearchConfig",
            "`settings.search` (every command; unset = the preset's value)",
            SearchConfig,
            robust,
        ),
        ("PipelineOptions", "`options` (`pulse run` and the flow only)", PipelineOptions, None),
    ]
    for title, where, cls, other in groups:
        lines += [f"## {title}: {where}", ""]
        if other is not None:
            lines += ["| Option | Field | reference | robust | Meaning |", "|---|---|---|---|---|"]
        else:
            lines += ["| Option | Field | Default | Meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            if f.name == "search":
                continue
            desc = f.metadata.get("description", "").replace("|", "\\|")
            cells = [f"`{flag(f.name)}`", f"`{f.name}`", f"`{f.default!r}`"]
            if other is not None:
                cells.append(f"`{getattr(other, f.name)!r}`")
            lines.append("| " + " | ".join([*cells, desc]) + " |")
        lines.append("")
    return "\n".join(lines)
