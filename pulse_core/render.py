"""What a restored input looks like in dest: sample PNGs, their LR checks and a contact sheet.

Keys derive from the input key and the sample index only (`a/b/photo.jpg` ->
`a/b/photo/sample-<k>.png`, `.../sample-<k>-lr.png`, `.../sheet.png`), so a re-run writes to the
same place and never to a random one.

A whole photo restored by the faces stage gets the same three kinds of file per face, one
folder per face (`a/b/photo/face-<i>/sample-<k>.png`, ...), and with faces=paste the photo itself
with every face pasted back (`a/b/photo/restored.png`). An input `a/b/photo/face-0.png` would
share its output folder with the first face of `a/b/photo.jpg`: do not name inputs so.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pulse_core.imaging import contact_sheet, encode_png
from pulse_core.restore import RestoreResult
from pulse_core.storage import Storage

# Names of what `write_outputs` puts in an output folder (and `restored.png`, the pasted photo).
OUTPUT_NAME = re.compile(r"^(?:sample-\d+(?:-lr)?|sheet|restored)\.png$")
# A face's output folder inside its photo's: `<photo folder>/face-<i>` (parent "" at the root).
FACE_FOLDER = re.compile(r"(?s)^(?:(?P<parent>.*)/)?face-(?:0|[1-9][0-9]*)$")
PHOTO_NAME = "restored.png"


def output_base(input_key: str) -> str:
    """`a/b/photo.jpg` -> `a/b/photo`: the folder of that input's samples in dest."""
    head, _, name = input_key.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}/{stem}" if head else stem


def face_base(input_key: str, face_index: int) -> str:
    """`a/b/photo.jpg`, face 2 -> `a/b/photo/face-2`: the folder of that face's samples."""
    return f"{output_base(input_key)}/face-{face_index}"


def photo_key(input_key: str) -> str:
    """`a/b/photo.jpg` -> `a/b/photo/restored.png`: the photo with its faces pasted back."""
    return f"{output_base(input_key)}/{PHOTO_NAME}"


def _folder(input_key: str, face_index: int | None) -> str:
    return output_base(input_key) if face_index is None else face_base(input_key, face_index)


def sample_keys(input_key: str, index: int, face_index: int | None = None) -> tuple[str, str]:
    """(HR sample key, LR check key) of one sample (of the input, or of one face of it)."""
    base = _folder(input_key, face_index)
    return f"{base}/sample-{index}.png", f"{base}/sample-{index}-lr.png"


def sheet_key(input_key: str, face_index: int | None = None) -> str:
    return f"{_folder(input_key, face_index)}/sheet.png"


def write_outputs(
    dest: Storage,
    input_key: str,
    result: RestoreResult,
    model_id: str,
    face_index: int | None = None,
) -> dict[int, tuple[str, str]]:
    """Write the selected samples, their LR checks and the sheet; return index -> keys.

    `face_index`: the samples are of that face of a whole photo (written in its `face_base`);
    None = of the input itself. Each PNG carries the input, seed, model and LR error in its
    text chunks, so a file that travels without its manifest still says where it came from.
    """
    keys: dict[int, tuple[str, str]] = {}
    labels = [f"input {result.lr.shape[-1]}px"]
    for s in result.samples:
        hr_key, lr_key = sample_keys(input_key, s.index, face_index)
        meta = {
            "pulse:input": input_key,
            "pulse:seed": str(s.seed),
            "pulse:model": model_id,
            "pulse:mse": f"{s.mse:.6g}",
            **({"pulse:face": str(face_index)} if face_index is not None else {}),
        }
        _write_png(dest, hr_key, encode_png(s.hr, metadata=meta))
        _write_png(dest, lr_key, encode_png(s.lr.clamp(0, 1)))
        keys[s.index] = (hr_key, lr_key)
        labels.append(f"#{s.index} {'ok' if s.converged else 'NOT converged'} mse={s.mse:.2g}")
    sheet = contact_sheet(
        result.lr,
        [s.hr for s in result.samples],
        [s.lr.clamp(0, 1) for s in result.samples],
        labels=labels,
    )
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    _write_png(dest, sheet_key(input_key, face_index), buf.getvalue())
    return keys


def write_photo(dest: Storage, input_key: str, image: Image.Image, model_id: str) -> str:
    """Write the photo with its faces pasted back (`restored.png`); return its key."""
    buf = io.BytesIO()
    info = PngInfo()
    info.add_text("pulse:input", input_key)
    info.add_text("pulse:model", model_id)
    image.save(buf, format="PNG", pnginfo=info)
    key = photo_key(input_key)
    _write_png(dest, key, buf.getvalue())
    return key


def written_keys(
    input_key: str, outputs: Mapping[int, tuple[str, str]], face_index: int | None = None
) -> set[str]:
    """Every key `write_outputs` wrote for `input_key` (or a face): samples, LR checks, sheet."""
    return {sheet_key(input_key, face_index), *(key for pair in outputs.values() for key in pair)}


def remove_stale_outputs(dest: Storage, input_key: str, keep: set[str]) -> list[str]:
    """Delete outputs of earlier runs in the input's folder that `keep` lacks; return their keys.

    An input is the unit of replacement: after a redo with fewer samples, `sample-3.png` of the
    older run would otherwise stay beside the new `sample-0.png`, looking like part of it; after
    a redo that found fewer faces, `face-3/` likewise. Call it after the new outputs are
    written, so a failed redo never leaves the folder empty. Only files with the names
    `write_outputs` and `write_photo` give (`OUTPUT_NAME`), directly in the folder or in a
    `face-<i>/` folder of it, are candidates: with dest == source the folder may also hold inputs, and
    other inputs' output folders (`photo/` holding `photo/x/` for `photo/x.png`).
    """
    folder = output_base(input_key) + "/"
    stale: list[str] = []
    for info in dest.list(prefix=folder, suffixes=(".png",)):
        sub, _, name = info.key[len(folder) :].rpartition("/")
        in_place = sub == "" or (FACE_FOLDER.match(sub) is not None and "/" not in sub)
        if in_place and OUTPUT_NAME.match(name) and info.key not in keep:
            stale.append(info.key)
    for key in stale:
        dest.delete(key)
    return stale


def _write_png(dest: Storage, key: str, data: bytes) -> None:
    dest.write_bytes(key, data, content_type="image/png")
