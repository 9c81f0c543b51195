"""Evaluation face sets from registry packages, written as a ground-truth folder for `pulse eval`.

106 real faces, each from a package (nothing from the web), checked by sha256:
- `astronaut`, `grace-hopper`: the repository's `examples/hr/*-64.png` (public domain);
- `biden`, `obama`, `obama2`, `obama3`: White House photographs from the face_recognition 1.3.0
  sdist (public domain), cropped square around eye centres located by eye;
- `lfw-000` ... `lfw-099`: the 25x25 greyscale face crops of scikit-image's `lfw_subset.npy`
  (the first 100 entries; the rest are not faces). LFW photos belong to their authors: used to
  measure, never committed.

Splits by index (`SPLITS`), so a rule can be chosen on one half and measured on the other:
`dev` = LFW 0-49 + astronaut, biden, obama; `held` = LFW 50-99 + grace-hopper, obama2, obama3.
The robust preset itself was chosen on all 106 (docs/evaluation.md): no split of these faces is
held out from that choice, only from later ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from pulse_core.errors import ModelFileError
from pulse_core.evaluation.assets import (
    LFW_ASSET,
    WHITE_HOUSE_ASSET,
    PackageAsset,
    cached_folder,
    fetch_asset,
)

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "hr"
# Eye centres (left, right) in photo pixels; the crop is a square of EYE_DIST_TO_SIDE x the eye
# distance, eyes centred horizontally at EYE_HEIGHT of the side: the framing of the bundled
# examples and of the demo generator's training crops.
WHITE_HOUSE_EYES = {
    "biden": ((531, 322), (650, 347)),
    "obama": ((444, 212), (550, 212)),
    "obama2": ((250, 370), (360, 378)),
    "obama3": ((735, 387), (862, 395)),
}
EYE_DIST_TO_SIDE = 3.2
EYE_HEIGHT = 0.43
EXAMPLES = ("astronaut", "grace-hopper")
LFW_FACES = 100
SPLITS: dict[str, tuple[set[str], range]] = {
    "dev": ({"astronaut", "biden", "obama"}, range(0, 50)),
    "held": ({"grace-hopper", "obama2", "obama3"}, range(50, 100)),
    "all": ({*EXAMPLES, *WHITE_HOUSE_EYES}, range(0, 100)),
    "colour": ({*EXAMPLES, *WHITE_HOUSE_EYES}, range(0)),
}


def eye_crop_box(left: tuple[int, int], right: tuple[int, int]) -> tuple[int, int, int, int]:
    side = round(EYE_DIST_TO_SIDE * math.dist(left, right))
    cx, cy = (left[0] + right[0]) / 2, (left[1] + right[1]) / 2
    x0, y0 = round(cx - side / 2), round(cy - EYE_HEIGHT * side)
    return (x0, y0, x0 + side, y0 + side)


def face_images(split: str = "all", *, offline: bool = False) -> dict[str, Image.Image]:
    """key -> ground-truth image of the split's faces (fetched from their packages if needed)."""
    colour, lfw_range = SPLITS[split]
    out: dict[str, Image.Image] = {}
    for stem in EXAMPLES:
        if stem in colour:
            out[stem] = Image.open(REPO_EXAMPLES / f"{stem}-64.png").convert("RGB")
    if colour & set(WHITE_HOUSE_EYES):
        folder = _fetch(WHITE_HOUSE_ASSET, offline)
        for stem, eyes in WHITE_HOUSE_EYES.items():
            if stem in colour:
                img = Image.open(folder / f"{stem}.jpg").convert("RGB")
                out[stem] = img.crop(eye_crop_box(*eyes))
    if len(lfw_range):
        lfw = np.load(_fetch(LFW_ASSET, offline) / "lfw_subset.npy")[:LFW_FACES]
        for i in lfw_range:
            out[f"lfw-{i:03d}"] = Image.fromarray((lfw[i] * 255).round().astype(np.uint8), "L")
    return out


def write_face_set(folder: Path, split: str = "all", *, offline: bool = False) -> list[Path]:
    """Write the split's faces as PNGs into `folder` (a ground-truth folder for `pulse eval`)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, img in face_images(split, offline=offline).items():
        path = folder / f"{key}.png"
        img.save(path)
        paths.append(path)
    return paths


def _fetch(asset: PackageAsset, offline: bool) -> Path:
    folder = cached_folder(asset)
    if folder is not None:
        return folder
    if offline:
        raise ModelFileError(f"{asset.name} ({asset.spec}) is not cached and offline is set")
    return fetch_asset(asset)


__all__ = ["SPLITS", "WHITE_HOUSE_EYES", "eye_crop_box", "face_images", "write_face_set"]
