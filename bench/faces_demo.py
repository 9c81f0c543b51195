"""Before/after pictures of whole photos through the faces stage, for docs/faces.md.

Runs `pulse upsample --faces paste` (the one pipeline: decode -> restore -> render -> record)
with the demo generator and the robust preset on two public-domain photos:

1. `grace_hopper.jpg` (tests/data/faces) reduced to a sixth, so her face is about 30 px wide, as
   in an old group snapshot; enlarged 2x;
2. a group photo composed from the test portraits (`tests.test_faces.compose_group`, four faces
   25-31 px wide) on the rocket photo; enlarged 2x.

Both sizes suit the demo generator, whose frame is 64 px: a 30 px face enlarged 2x fills about
60 px, so the generator draws at least the pixels the enlargement needs. (A 60 px face enlarged
3x would be pasted at 180 px from a 64 px frame: blurrier than Lanczos. Larger faces want a
larger generator.) The script writes, under `--out` (default docs/img):

- `faces-before-after.png`: the head of photo 1, Lanczos | faces pasted, shown 2x (nearest);
- `faces-group.png`: the left half of photo 2, Lanczos | faces pasted;
- `faces-sheet.png`: the contact sheet of each face of photo 2 (its LR input, its samples and
  their downscales), one face a row.

Needs the demo model and the MTCNN weights (`make model`). About a minute on 2 CPU cores.
Usage: python bench/faces_demo.py [--out docs/img] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pulse_cli.main import main as pulse  # noqa: E402
from pulse_core.faces.paste import upscale_photo  # noqa: E402
from tests.test_faces import DATA, GROUP_WIDTHS, compose_group  # noqa: E402

LABEL_HEIGHT = 18


def restore(photos: Path, out: Path, upscale: int, samples: int) -> dict:
    """`pulse upsample PHOTOS --faces paste`; returns the run summary."""
    code = pulse(
        [
            "upsample",
            str(photos),
            "--out",
            str(out),
            "--faces",
            "paste",
            "--upscale",
            str(upscale),
            "--samples",
            str(samples),
            "--quiet",
        ]
    )
    if code != 0:
        raise SystemExit(f"pulse upsample failed (exit {code})")
    return json.loads((out / "summary.json").read_text())


def side_by_side(left: Image.Image, right: Image.Image, titles: tuple[str, str]) -> Image.Image:
    """Two equal-sized images with a caption above each."""
    w, h = left.size
    out = Image.new("RGB", (2 * w + 8, h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    for i, (image, title) in enumerate(zip((left, right), titles, strict=True)):
        out.paste(image, (i * (w + 8), LABEL_HEIGHT))
        draw.text((i * (w + 8) + 4, 3), title, fill="black")
    return out


def before_after(
    photo: Path, restored: Path, upscale: int, box: tuple[int, int, int, int], zoom: int = 1
) -> Image.Image:
    """Lanczos | restored, both cropped to `box` (output pixels), then shown `zoom`x (nearest)."""
    with Image.open(photo) as src, Image.open(restored) as got:
        plain = upscale_photo(src.convert("RGB"), upscale).crop(box)
        pasted = got.convert("RGB").crop(box)
    if zoom > 1:
        size = (plain.width * zoom, plain.height * zoom)
        plain = plain.resize(size, Image.Resampling.NEAREST)
        pasted = pasted.resize(size, Image.Resampling.NEAREST)
    titles = (f"Lanczos x{upscale}", f"faces restored, pasted, x{upscale}")
    return side_by_side(plain, pasted, titles)


def sheets(folder: Path) -> Image.Image:
    """Every `face-<i>/sheet.png` of a restored photo, one under the other."""
    faces = sorted(folder.glob("face-*/sheet.png"), key=lambda p: int(p.parent.name[5:]))
    images = [Image.open(p).convert("RGB") for p in faces]
    width = max(im.width for im in images)
    out = Image.new("RGB", (width, sum(im.height for im in images)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


def run(out_dir: Path, samples: int) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="pulse-faces-demo-") as tmp:
        root = Path(tmp)
        (root / "snapshot").mkdir()
        with Image.open(DATA / "grace_hopper.jpg") as im:
            small = im.resize((im.width // 6, im.height // 6), Image.Resampling.LANCZOS)
        small.save(root / "snapshot" / "grace_hopper_small.png")
        restore(root / "snapshot", root / "snapshot-out", 2, samples)
        picture = before_after(
            root / "snapshot" / "grace_hopper_small.png",
            root / "snapshot-out" / "grace_hopper_small" / "restored.png",
            2,
            (40, 20, 140, 130),
            zoom=2,
        )
        written["before_after"] = out_dir / "faces-before-after.png"
        picture.save(written["before_after"], optimize=True)

        (root / "group").mkdir()
        group, _ = compose_group(GROUP_WIDTHS[:4], (600, 200), cols=4)
        group.save(root / "group" / "group.png")
        summary = restore(root / "group", root / "group-out", 2, samples)
        picture = before_after(
            root / "group" / "group.png",
            root / "group-out" / "group" / "restored.png",
            2,
            (0, 40, 600, 360),
        )
        written["group"] = out_dir / "faces-group.png"
        picture.save(written["group"], optimize=True)
        written["sheet"] = out_dir / "faces-sheet.png"
        sheets(root / "group-out" / "group").save(written["sheet"], optimize=True)
        print(
            f"group photo: {summary['faces_restored']} faces restored in {summary['seconds']:.1f} s"
        )
    return written


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="folder for the PNGs")
    p.add_argument("--samples", type=int, default=2, help="samples per face")
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    for name, path in run(args.out, args.samples).items():
        print(f"{name}: {path} ({path.stat().st_size // 1024} KB)")
