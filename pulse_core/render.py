"""What a restored input looks like in dest: sample PNGs, their LR checks and a contact sheet.

Keys derive from the input key and the sample index only (`a/b/photo.jpg` ->
`a/b/photo/sample-<k>.png`, `.../sample-<k>-lr.png`, `.../sheet.png`), so a re-run writes to the
same place and never to a random one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

from pulse_core.imaging import contact_sheet, encode_png
from pulse_core.restore import RestoreResult
from pulse_core.storage import Storage

# Names of what `write_outputs` puts in an input's output folder.
OUTPUT_NAME = re.compile(r"^(?:sample-\d+(?:-lr)?|sheet)\.png$")


def output_base(input_key: str) -> str:
    """`a/b/photo.jpg` -> `a/b/photo`: the folder of that input's samples in dest."""
    head, _, name = input_key.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}/{stem}" if head else stem


def sample_keys(input_key: str, index: int) -> tuple[str, str]:
    """(HR sample key, LR check key) of one sample."""
    base = output_base(input_key)
    return f"{base}/sample-{index}.png", f"{base}/sample-{index}-lr.png"


def sheet_key(input_key: str) -> str:
    return f"{output_base(input_key)}/sheet.png"


def write_outputs(
    dest: Storage, input_key: str, result: RestoreResult, model_id: str
) -> dict[int, tuple[str, str]]:
    """Write the selected samples, their LR checks and the sheet; return index -> keys.

    Each PNG carries the input, seed, model and LR error in its text chunks, so a file that
    travels without its manifest still says where it came from.
    """
    keys: dict[int, tuple[str, str]] = {}
    labels = [f"input {result.lr.shape[-1]}px"]
    for s in result.samples:
        hr_key, lr_key = sample_keys(input_key, s.index)
        meta = {
            "pulse:input": input_key,
            "pulse:seed": str(s.seed),
            "pulse:model": model_id,
            "pulse:mse": f"{s.mse:.6g}",
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
    _write_png(dest, sheet_key(input_key), buf.getvalue())
    return keys


def written_keys(input_key: str, outputs: Mapping[int, tuple[str, str]]) -> set[str]:
    """Every key `write_outputs` wrote for `input_key`: its samples, LR checks and sheet."""
    return {sheet_key(input_key), *(key for pair in outputs.values() for key in pair)}


def remove_stale_outputs(dest: Storage, input_key: str, keep: set[str]) -> list[str]:
    """Delete outputs of earlier runs in the input's folder that `keep` lacks; return their keys.

    An input is the unit of replacement: after a redo with fewer samples, `sample-3.png` of the
    older run would otherwise stay beside the new `sample-0.png`, looking like part of it. Call
    it after the new outputs are written, so a failed redo never leaves the folder empty.
    Only direct children of the folder whose names `write_outputs` could have made
    (`OUTPUT_NAME`) are candidates: with dest == source the folder may also hold inputs, and
    other inputs' output folders (`photo/` holding `photo/x/` for `photo/x.png`).
    """
    folder = output_base(input_key) + "/"
    stale: list[str] = []
    for info in dest.list(prefix=folder, suffixes=(".png",)):
        name = info.key[len(folder) :]
        if "/" not in name and OUTPUT_NAME.match(name) and info.key not in keep:
            stale.append(info.key)
    for key in stale:
        dest.delete(key)
    return stale


def _write_png(dest: Storage, key: str, data: bytes) -> None:
    dest.write_bytes(key, data, content_type="image/png")
