"""The `pulse` command line: upsample local images, manage models (and run the pipeline)."""

from __future__ import annotations

import argparse
import sys

from pulse_cli import models, run, upsample
from pulse_core.errors import PulseError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pulse",
        description="PULSE photo upsampling: restore low-resolution faces by searching a generator's latent space.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{upsample,run,models}")

    up = sub.add_parser(
        "upsample",
        help="restore local images into a folder",
        description="Restore local LR images (files or folders) into OUT: per input a folder with the HR "
        "samples, their downscales (the LR check) and a contact sheet; a summary table at the end. "
        "Exits 1 if any input failed, naming it and why.",
    )
    up.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files or folders (scanned recursively)"
    )
    up.add_argument("--out", required=True, help="output folder")
    up.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    upsample.add_search_arguments(up)
    up.set_defaults(func=upsample.run_upsample)

    run.add_parser(sub)
    models.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PulseError as exc:
        print(f"pulse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pulse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
