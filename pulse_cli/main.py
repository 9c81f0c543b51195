"""The `pulse` command line: upsample local images, manage models (and run the pipeline)."""

from __future__ import annotations

import argparse
import sys

from pulse_cli import eval as eval_cmd
from pulse_cli import models, options, run, upsample
from pulse_core.errors import PulseError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pulse",
        description="PULSE photo upsampling: restore low-resolution faces by searching a generator's latent space.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{upsample,run,eval,settings,models}"
    )

    upsample.add_parser(sub)
    run.add_parser(sub)
    eval_cmd.add_parser(sub)
    options.add_parser(sub)
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
