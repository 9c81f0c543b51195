"""Decode, validate and normalise input images; encode outputs.

Every input reaches the search as one kind of thing: a float32 RGB tensor (3, s, s) in [0, 1]
whose side s divides the generator's resolution. This module is where the world's variety of
image files is turned into that, and where anything that cannot be turned into it becomes an
`InputError` whose message says what is wrong and what to do, so that a batch records one failed
input instead of crashing (the reference crashed on RGBA, palette, greyscale and non-square
inputs: pulse-reference.md section 9).

Each normalisation step is recorded in human-readable words (`conversions`) because the search
only ever sees the normalised pixels: when a result looks wrong, the manifest must say whether
the input was rotated, composited, cropped or rescaled on its way in.

Nothing here resizes an input: PULSE's answer depends on the forward operator, so an image that
is not already an allowed LR size is refused with the list of sizes that would work, and the
user downscales it consciously (with the operator they mean).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageDraw, ImageFile, ImageFont, ImageOps, PngImagePlugin

from pulse_core.atomic import atomic_write_bytes
from pulse_core.errors import ConfigError, InputError

# LR inputs are at most resolution / 2 pixels a side (512 for the 1024^2 generators), so an
# input of many megapixels is a mistake or an attack. 16 MP still admits any real LR scan,
# non-square ones included, and keeps the float32 tensor of an accepted input under 200 MB.
# It is also below Pillow's own warning threshold (~89 MP), so accepted inputs never warn.
DEFAULT_MAX_PIXELS = 4096 * 4096

MIN_SIDE = 2  # the smallest LR side the search can use: a 1x1 input has no spatial content

FIT_POLICIES = ("center-crop", "pad", "none")

# Formats Pillow can read that we refuse outright. EPS is decoded by running Ghostscript, an
# external interpreter, on the file: not something to do with untrusted uploads.
REFUSED_FORMATS = frozenset({"EPS"})

# Modes that carry an alpha channel (premultiplied ones included).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# Pillow only exposes truncation tolerance as a module global (`LOAD_TRUNCATED_IMAGES`) that any
# other library in the process may have switched on. We hold it False for the duration of our
# own open + decode; the lock keeps two of our threads from restoring each other's saved value
# halfway through a decode. The global is only written when someone else had set it True.
# Decodes are serialised by the lock; LR inputs decode in milliseconds, so that costs little.
_DECODE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedImage:
    """A decoded input, normalised to RGB, with a record of how it got there."""

    tensor: torch.Tensor  # float32 (3, H, W) in [0, 1], after EXIF orientation
    width: int  # W, after orientation
    height: int  # H, after orientation
    original_mode: str  # Pillow mode of the file as decoded: "RGB", "RGBA", "P", "I;16", "CMYK"...
    format: str  # Pillow format name: "PNG", "JPEG", "WEBP"...
    checksum: str  # sha256 hex of the raw input bytes: identifies the input in manifests
    name: str = "<bytes>"  # what error messages and logs call this input
    conversions: list[str] = field(default_factory=list)  # each normalisation step, in order


def load_image(
    data: bytes | Path | str,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Decode any Pillow-readable image into a normalised RGB tensor, or raise `InputError`.

    `data` is the file's bytes or a path to it (a `str` is always a path). `name` is used in
    messages; it defaults to the file name, or "<bytes>". `max_pixels` bounds width * height and
    is checked from the header alone, before a single pixel is decoded. Pillow's own
    decompression-bomb guard (2 * `Image.MAX_IMAGE_PIXELS`, ~179 MP, and a warning above ~89 MP)
    also applies at open; we leave that process-wide setting alone, so a `max_pixels` above it
    has no effect beyond it.
    """
    if not isinstance(max_pixels, int) or max_pixels < MIN_SIDE * MIN_SIDE:
        raise ConfigError(f"max_pixels must be an integer >= {MIN_SIDE * MIN_SIDE}")
    raw, name = _read_bytes(data, name)
    if not raw:
        raise InputError(f"{name}: the file is empty (0 bytes); re-export or re-upload the image")
    checksum = hashlib.sha256(raw).hexdigest()
    conversions: list[str] = []

    with _strict_decoding():
        img = _open_header(raw, name)
        try:
            _check_dimensions(img.size, name, max_pixels)
            fmt = img.format or "unknown"
            if _is_wide_colour_read_as_8_bit(img):
                conversions.append("16 bits per channel decoded at 8 bits")
            try:
                frames = getattr(img, "n_frames", 1)  # GIF/TIFF/WebP scan their frame headers
                img.load()  # full decode: a truncated file fails here, not later
            except Exception as e:
                raise InputError(
                    f"{name}: the {fmt} data cannot be decoded ({_reason(e)}); the file is "
                    "probably truncated or corrupt: re-download or re-export it"
                ) from e
        except BaseException:
            img.close()
            raise

    try:
        if isinstance(frames, int) and frames > 1:
            conversions.append(f"first of {frames} frames used")
        return _normalise(img, name, fmt, checksum, conversions)
    finally:
        img.close()


def image_from_pil(image: Image.Image, *, name: str = "<image>") -> LoadedImage:
    """Normalise an in-memory PIL image exactly as `load_image` normalises a file.

    EXIF orientation, 16-bit and float modes, CMYK, palette, alpha and grey all go through the
    same steps, recorded in `conversions`, so a notebook's `restore(pil_image)` searches the
    same pixels as `pulse upsample` on that image's file. The checksum is of the decoded pixels
    (there are no file bytes).
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL.Image, got {type(image).__name__}")
    if image.width < MIN_SIDE or image.height < MIN_SIDE:
        raise InputError(f"{name}: the image is {image.width}x{image.height}; too small")
    digest = hashlib.sha256(image.mode.encode() + repr(image.size).encode() + image.tobytes())
    return _normalise(image, name, image.format or "in-memory", digest.hexdigest(), [])


def _normalise(
    img: Image.Image, name: str, fmt: str, checksum: str, conversions: list[str]
) -> LoadedImage:
    """Decoded image -> RGB float tensor: orientation, then colour conversions (recorded)."""
    mode = img.mode
    try:
        img = _apply_exif_orientation(img, conversions)
        rgb = _to_rgb_array(img, conversions)
    except InputError:
        raise
    except Exception as e:
        raise InputError(
            f"{name}: the {fmt} image (mode {mode}) cannot be converted to RGB ({_reason(e)}); "
            "re-save it as an 8-bit RGB PNG or JPEG"
        ) from e
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    return LoadedImage(
        tensor=tensor,
        width=tensor.shape[2],
        height=tensor.shape[1],
        original_mode=mode,
        format=fmt,
        checksum=checksum,
        name=name,
        conversions=conversions,
    )


def _read_bytes(data: bytes | Path | str, name: str | None) -> tuple[bytes, str]:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data), name or "<bytes>"
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        label = name or path.name or str(path)
        try:
            return path.read_bytes(), label
        except FileNotFoundError:
            raise InputError(f"{label}: no such file ({path}); check the path") from None
        except OSError as e:
            raise InputError(f"{label}: cannot read {path} ({_reason(e)})") from e
    raise ConfigError(f"load_image takes bytes or a path, not {type(data).__name__}")


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Hold Pillow's truncation tolerance off while we open and decode (see `_DECODE_LOCK`)."""
    with _DECODE_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        if saved:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            if saved:
                ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _readable_formats() -> list[str]:
    Image.init()  # registers every plugin once; afterwards a no-op
    return [f for f in Image.ID if f not in REFUSED_FORMATS]


def _open_header(raw: bytes, name: str) -> Image.Image:
    """`Image.open` reads the header only: size, mode and format, no pixels yet."""
    try:
        return Image.open(io.BytesIO(raw), formats=_readable_formats())
    except Image.DecompressionBombError as e:
        raise InputError(
            f"{name}: the image header claims more pixels than can be decoded safely ({e}); "
            "it is a decompression bomb or far too large for an LR input; if it is a genuine "
            "image, downscale or crop it before submitting it"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise InputError(
            f"{name}: not a readable image ({len(raw)} bytes that no image decoder recognises; "
            f"starts with {raw[:8]!r}); check that the file is really an image (PNG, JPEG, WebP, "
            "TIFF, BMP, GIF...) and not e.g. a text or HTML file with an image extension"
        ) from e
    except Exception as e:
        raise InputError(f"{name}: the image header cannot be read ({_reason(e)})") from e


def _check_dimensions(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise InputError(
            f"{name}: the image header claims {w}x{h} = {w * h} pixels, more than the limit of "
            f"{max_pixels}; LR inputs are small: downscale or crop it, or raise max_pixels if "
            "this size is intended"
        )
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError(
            f"{name}: the image is {w}x{h}; an LR input needs at least {MIN_SIDE}x{MIN_SIDE} pixels"
        )


def _is_wide_colour_read_as_8_bit(img: Image.Image) -> bool:
    """Pillow has no 16-bit colour modes: 48/64-bit PNG and TIFF are decoded as 8-bit RGB(A).

    That loses the low byte, which is harmless for an LR input but worth recording. The raw
    mode is only visible in the tile list, before `load()`.
    """
    if img.mode.startswith(("I", "F")):
        return False
    for tile in getattr(img, "tile", None) or []:
        args = getattr(tile, "args", None)
        rawmode = args if isinstance(args, str) else None
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            rawmode = args[0]
        if rawmode and ";16" in rawmode:
            return True
    return False


def _apply_exif_orientation(img: Image.Image, conversions: list[str]) -> Image.Image:
    """Rotate/flip to how the image is meant to be seen: phones store pixels sideways."""
    try:
        orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as e:
        conversions.append(f"EXIF unreadable, orientation not applied ({_reason(e)})")
        return img
    if orientation not in range(2, 9):
        return img
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception as e:
        conversions.append(f"exif-orientation {orientation} could not be applied ({_reason(e)})")
        return img
    if rotated is None or rotated is img:
        return img
    img.close()
    conversions.append(f"exif-orientation {orientation} applied")
    return rotated


def _to_rgb_array(img: Image.Image, conversions: list[str]) -> np.ndarray:
    """Any Pillow mode -> float32 (H, W, 3) in [0, 1], recording each step."""
    mode = img.mode

    if mode.startswith("I;16"):
        grey = np.asarray(img).astype(np.float32) / 65535.0
        conversions.append(f"16-bit greyscale ({mode}) scaled from 0..65535 to 0..1")
        conversions.append("greyscale -> RGB")
        return _grey_to_rgb(grey)
    if mode == "I":
        values = np.asarray(img)
        clipped = int(np.count_nonzero((values < 0) | (values > 65535)))
        grey = np.clip(values, 0, 65535).astype(np.float32) / 65535.0
        note = "32-bit integer greyscale read as 16-bit, scaled from 0..65535 to 0..1"
        conversions.append(note + (f" ({clipped} values outside clipped)" if clipped else ""))
        conversions.append("greyscale -> RGB")
        return _grey_to_rgb(grey)
    if mode == "F":
        return _grey_to_rgb(_float_grey(np.asarray(img, dtype=np.float32), conversions))

    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    colour = {
        "1": "bilevel -> RGB",
        "L": "greyscale -> RGB",
        "LA": "greyscale -> RGB",
        "La": "greyscale -> RGB",
        "P": "palette -> RGB",
        "PA": "palette -> RGB",
        "CMYK": "CMYK -> RGB"
        + (" (naive, embedded ICC profile ignored)" if img.info.get("icc_profile") else ""),
    }.get(mode)
    if colour is None and mode not in {"RGB", "RGBA", "RGBa", "RGBX"}:
        colour = f"{mode} -> RGB"
    if colour:
        conversions.append(colour)

    if not has_alpha:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0

    # Transparent regions of a scanned or cut-out photo are the paper (or nothing at all):
    # white is what a viewer shows and what the LR photo would have looked like printed.
    # Black, Pillow's implicit choice when alpha is simply dropped, would invent dark borders
    # that the search would then try to explain with a face.
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3:4]
    label = "transparency" if mode not in _ALPHA_MODES else f"{mode} alpha"
    if float(alpha.min()) >= 1.0:
        conversions.append(f"{label} dropped (fully opaque)")
        return np.ascontiguousarray(rgba[..., :3])
    conversions.append(f"{label} composited on white")
    return rgba[..., :3] * alpha + (1.0 - alpha)


def _float_grey(values: np.ndarray, conversions: list[str]) -> np.ndarray:
    """Float images carry no declared range: infer the usual ones from the maximum."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    top = float(values.max()) if values.size else 0.0
    if top <= 1.0:
        scale, note = 1.0, "32-bit float greyscale taken as 0..1"
    elif top <= 255.0:
        scale, note = 255.0, "32-bit float greyscale scaled from 0..255 to 0..1"
    else:
        scale, note = 65535.0, "32-bit float greyscale scaled from 0..65535 to 0..1"
    conversions.append(note + " (values outside clipped)")
    conversions.append("greyscale -> RGB")
    return np.clip(values / scale, 0.0, 1.0).astype(np.float32)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2).astype(np.float32)


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Non-square inputs


@dataclass(frozen=True)
class FitRecord:
    """How a (possibly non-square) input was made square, for the manifest.

    `box` is the square's extent in the original image's pixel coordinates; with "pad" it reaches
    outside the image (negative left/top, right/bottom beyond the size), which is exactly the
    region the generator is asked to explain.
    """

    policy: str  # "center-crop", "pad" or "none"
    original: tuple[int, int]  # (width, height) before fitting
    box: tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels added (left, top, right, bottom)

    @property
    def changed(self) -> bool:
        w, h = self.original
        return self.box != (0, 0, w, h)

    def describe(self) -> str:
        w, h = self.original
        side = self.box[2] - self.box[0]
        if not self.changed:
            return f"{w}x{h} already square"
        if self.policy == "pad":
            return f"{w}x{h} edge-padded to {side}x{side} (pad l/t/r/b = {self.pad})"
        return f"{w}x{h} centre-cropped to {side}x{side} (box l/t/r/b = {self.box})"


def fit_to_square(
    tensor: torch.Tensor, policy: str = "center-crop"
) -> tuple[torch.Tensor, FitRecord]:
    """Make a (3, H, W) image square by the named policy; the generators are all square.

    - "center-crop" keeps the middle of the longer side (odd leftovers go to the right/bottom):
      subjects are usually centred and cropping invents nothing.
    - "pad" replicates edge pixels out to the longer side. Edge replication rather than reflect:
      reflect cannot pad by more than the side minus one, and mirroring a face's half would
      hand the search a second eye to explain; a flat streak is the least informative fill.
    - "none" refuses non-square inputs.
    """
    if policy not in FIT_POLICIES:
        raise ConfigError(
            f"unknown fit policy {policy!r}; choose one of: {', '.join(FIT_POLICIES)}"
        )
    _check_image_tensor(tensor, "fit_to_square")
    h, w = int(tensor.shape[1]), int(tensor.shape[2])
    if w == h:
        return tensor, FitRecord(policy=policy, original=(w, h), box=(0, 0, w, h))
    if policy == "none":
        raise InputError(
            f"the image is {w}x{h}, not square, and the fit policy is 'none'; crop it square "
            "yourself or choose the 'center-crop' or 'pad' policy"
        )
    if policy == "center-crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        return tensor[:, top : top + side, left : left + side].contiguous(), FitRecord(
            policy=policy, original=(w, h), box=box
        )
    side = max(w, h)
    pl, pt = (side - w) // 2, (side - h) // 2
    pr, pb = side - w - pl, side - h - pt
    padded = F.pad(tensor[None], (pl, pr, pt, pb), mode="replicate")[0]
    box = (-pl, -pt, w + pr, h + pb)
    return padded, FitRecord(policy=policy, original=(w, h), box=box, pad=(pl, pt, pr, pb))


# ---------------------------------------------------------------------------------------------
# LR sizes and the prepared input


def allowed_lr_sizes(resolution: int) -> list[int]:
    """LR sides s usable with a generator of this resolution: s divides it, 2 <= s <= res / 2.

    Integer factors only because DS is an integer-factor operator; factor >= 2 because factor 1
    means there is nothing to upsample.
    """
    if not isinstance(resolution, int) or resolution < 2 * MIN_SIDE:
        raise ConfigError(f"generator resolution must be an integer >= 4, got {resolution!r}")
    return [s for s in range(MIN_SIDE, resolution // 2 + 1) if resolution % s == 0]


def check_lr_size(size: int, resolution: int) -> int:
    """The downscale factor resolution // size, or `InputError` listing the sizes that work."""
    allowed = allowed_lr_sizes(resolution)
    if not isinstance(size, int) or isinstance(size, bool):
        raise ConfigError(f"LR size must be an integer, got {size!r}")
    if size in allowed:
        return resolution // size
    listed = ", ".join(map(str, allowed))
    res = f"{resolution}x{resolution}"
    if size == resolution:
        why = f"equals the generator resolution {res}: there is nothing to upsample"
    elif size > resolution // 2:
        why = f"is larger than any LR size for generator resolution {res}"
    elif size < MIN_SIDE:
        why = f"is below the minimum of {MIN_SIDE}x{MIN_SIDE}"
    else:
        why = f"does not divide generator resolution {res} by an integer factor"
    raise InputError(
        f"LR size {size}x{size} {why}; allowed LR sizes for {res} are {listed}: downscale the "
        "image to one of them with the forward operator you mean"
    )


@dataclass
class PreparedInput:
    """A square LR input ready for the search, with what was done to get it."""

    tensor: torch.Tensor  # float32 (3, s, s) in [0, 1]
    factor: int  # resolution // s: the integer factor of the forward operator
    resolution: int  # side of the generator's output
    fit: FitRecord  # how the input was made square
    conversions: list[str] = field(default_factory=list)  # loading steps, then the fit's

    @property
    def lr_size(self) -> int:
        return int(self.tensor.shape[-1])


def prepare_input(
    loaded: LoadedImage, resolution: int, policy: str = "center-crop"
) -> PreparedInput:
    """Fit a loaded image to a square and check its side against the generator's resolution.

    An input that is square but not an allowed size is refused, never resized: which
    downscaler made the LR image is part of the problem PULSE solves, so the choice belongs to
    the user.
    """
    tensor, fit = fit_to_square(loaded.tensor, policy)
    side = int(tensor.shape[-1])
    try:
        factor = check_lr_size(side, resolution)
    except InputError as e:
        fitted = f", {fit.describe()}" if fit.changed else ""
        raise InputError(f"{loaded.name} ({loaded.width}x{loaded.height}{fitted}): {e}") from None
    conversions = list(loaded.conversions)
    if fit.changed:
        conversions.append(fit.describe())
    return PreparedInput(
        tensor=tensor, factor=factor, resolution=resolution, fit=fit, conversions=conversions
    )


# ---------------------------------------------------------------------------------------------
# Encoding


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> 8-bit RGB image; out-of-range values clamp, NaN -> 0."""
    _check_image_tensor(tensor, "to_pil")
    x = torch.nan_to_num(tensor.detach().to("cpu", torch.float32), nan=0.0)
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def encode_png(tensor: torch.Tensor, *, metadata: Mapping[str, str] | None = None) -> bytes:
    """PNG bytes of a (3, H, W) image; `metadata` goes into tEXt chunks (seed, generator...)."""
    info = None
    if metadata:
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(str(key), str(value))
    buf = io.BytesIO()
    to_pil(tensor).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(
    tensor: torch.Tensor, path: str | Path, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a PNG atomically (`pulse_core.atomic`) so a killed run never leaves half a file."""
    path = Path(path)
    atomic_write_bytes(path, encode_png(tensor, metadata=metadata))
    return path


def _check_image_tensor(tensor: torch.Tensor, where: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ConfigError(f"{where} expects an RGB image tensor of shape (3, H, W), got {shape}")


# ---------------------------------------------------------------------------------------------
# Contact sheet

SHEET_MARGIN = 4  # pixels around and between cells
SHEET_BACKGROUND = (255, 255, 255)
SHEET_TEXT = (0, 0, 0)


def contact_sheet(
    lr: torch.Tensor,
    samples: Sequence[torch.Tensor],
    downscaled: Sequence[torch.Tensor],
    *,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """One picture to judge a run: does each sample look right, and does it explain the input?

    Layout, one column per image, every cell H x W (the samples' size):

        [label]   [label]     [label]   ...
        LR input  sample 0    sample 1  ...
        (blank)   DS(sample0) DS(sample1)

    The LR input and the downscales are upscaled with nearest neighbour so that their real
    pixels stay visible. `labels` (optional) has one short text per column, input first; it is
    wrapped on spaces to the column width.
    """
    _check_image_tensor(lr, "contact_sheet")
    if not samples:
        raise ConfigError("contact_sheet needs at least one sample")
    if len(downscaled) != len(samples):
        raise ConfigError(
            f"contact_sheet got {len(samples)} samples but {len(downscaled)} downscales"
        )
    for t in [*samples, *downscaled]:
        _check_image_tensor(t, "contact_sheet")
    size = tuple(samples[0].shape)
    if any(tuple(s.shape) != size for s in samples):
        raise ConfigError("contact_sheet samples must all have the same shape")
    columns = 1 + len(samples)
    if labels is not None and len(labels) != columns:
        raise ConfigError(
            f"contact_sheet needs {columns} labels (input first, then one per sample), "
            f"got {len(labels)}"
        )
    h, w = int(size[1]), int(size[2])
    m = SHEET_MARGIN

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(text, font, measure, w) for text in labels] if labels else []
    line_h = _line_height(font, measure)
    label_h = max((len(lines) for lines in wrapped), default=0) * line_h
    label_h = label_h + m if label_h else 0

    sheet = Image.new("RGB", (m + columns * (w + m), m + label_h + 2 * (h + m)), SHEET_BACKGROUND)
    row0, row1 = m + label_h, m + label_h + h + m
    for col in range(columns):
        x = m + col * (w + m)
        if label_h:
            # Drawn on a cell-wide canvas so that an over-long word is clipped at the column's
            # edge instead of running into the next label.
            canvas = Image.new("RGB", (w, label_h - m), SHEET_BACKGROUND)
            pen = ImageDraw.Draw(canvas)
            for i, line in enumerate(wrapped[col]):
                pen.text((0, i * line_h), line, fill=SHEET_TEXT, font=font)
            sheet.paste(canvas, (x, m))
        if col == 0:
            sheet.paste(to_pil(lr).resize((w, h), Image.Resampling.NEAREST), (x, row0))
            continue
        sheet.paste(to_pil(samples[col - 1]), (x, row0))
        down = to_pil(downscaled[col - 1]).resize((w, h), Image.Resampling.NEAREST)
        sheet.paste(down, (x, row1))
    return sheet


_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont


def _line_height(font: _Font, draw: ImageDraw.ImageDraw) -> int:
    return int(draw.textbbox((0, 0), "Ag|", font=font)[3]) + 2


def _wrap(text: str, font: _Font, draw: ImageDraw.ImageDraw, width: int) -> list[str]:
    """Greedy word wrap on spaces; a single word wider than the column stays on its own line."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
