"""The `pulse` command line, run in-process."""

import json
import shutil
from pathlib import Path

import pytest

from pulse_cli.main import build_parser, main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["upsample"],
        ["run"],
        ["models"],
        ["models", "list"],
        ["models", "pull"],
        ["models", "info"],
        ["models", "import"],
    ],
)
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: pulse" in capsys.readouterr().out


def test_upsample_writes_samples_checks_sheets_and_summary(demo_generator, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "upsample",
            str(EXAMPLES / "astronaut-16.png"),
            str(EXAMPLES / "grace-hopper-8.png"),
            "--out",
            str(out),
            "--samples",
            "2",
            "--steps",
            "5",
            "--quiet",
        ]
    )
    assert code == 0
    for stem in ("astronaut-16", "grace-hopper-8"):
        folder = out / stem
        assert sorted(p.name for p in folder.iterdir()) == [
            "sample-0-lr.png",
            "sample-0.png",
            "sample-1-lr.png",
            "sample-1.png",
            "sheet.png",
        ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "demo" and len(summary["inputs"]) == 2
    assert len({s["seed"] for i in summary["inputs"] for s in i["samples"]}) == 4
    assert (out / "_runs" / summary["run_id"] / "samples.parquet").is_file()
    assert list((out / "_manifest" / "samples").glob("*.parquet"))
    printed = capsys.readouterr().out
    assert "astronaut-16.png" in printed and "converged" in printed


def test_upsample_finishes_all_inputs_and_exits_nonzero_naming_failures(
    demo_generator, tmp_path, capsys
):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(EXAMPLES / "astronaut-8.png", src / "good.png")
    (src / "broken.jpg").write_text("not an image")
    (src / "empty.png").write_bytes(b"")
    code = main(
        [
            "upsample",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--samples",
            "1",
            "--steps",
            "3",
            "--quiet",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "2 of 3 input(s) failed" in err and "broken.jpg" in err and "empty.png" in err
    assert (tmp_path / "out" / "good" / "sample-0.png").is_file()


def test_upsample_json_report(demo_generator, tmp_path, capsys):
    code = main(
        [
            "upsample",
            str(EXAMPLES / "astronaut-8.png"),
            "--out",
            str(tmp_path),
            "--samples",
            "1",
            "--steps",
            "3",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"][0]["status"] == "ok" and report["inputs"][0]["factor"] == 8
    assert report == json.loads((tmp_path / "summary.json").read_text())


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "upsample",
            str(EXAMPLES / "astronaut-8.png"),
            "--out",
            str(tmp_path),
            "--model",
            "no-such-model",
        ]
    )
    assert code == 2
    assert "no-such-model" in capsys.readouterr().err


def test_models_list_shows_the_demo(capsys):
    assert main(["models", "list", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)]
    assert "demo" in names
