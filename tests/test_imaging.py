"""Specification of pulse_core.imaging: what inputs are accepted, how they are normalised, and
how bad ones are refused. Every test image is generated here, in memory or under tmp_path."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from pulse_core.errors import ConfigError, InputError
from pulse_core.imaging import (
    FitRecord,
    LoadedImage,
    allowed_lr_sizes,
    check_lr_size,
    contact_sheet,
    encode_png,
    fit_to_square,
    load_image,
    prepare_input,
    save_png,
    to_pil,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ---------------------------------------------------------------------------------------------
# Helpers


def _encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random pixels: they do not compress, so a cut file really lacks pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _handmade_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte, so it can claim anything in its header."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _solid(rgb: tuple[float, float, float], height: int, width: int) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, height, width).clone()


# ---------------------------------------------------------------------------------------------
# Refusals: each says what is wrong


def test_zero_byte_file_is_refused_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.png: the file is empty \(0 bytes\)"):
        load_image(path)


def test_text_file_named_jpg_is_refused_as_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_text("<html>404 not found</html>\n")
    with pytest.raises(InputError, match=r"photo\.jpg: not a readable image"):
        load_image(path)


def test_missing_file_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "absent.png")


def test_truncated_png_is_refused() -> None:
    data = _encode(_noise(64, 64))
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2], name="cut.png")


def test_truncated_jpeg_is_refused() -> None:
    data = _encode(_noise(64, 64), "JPEG", quality=95)
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(data[: len(data) * 2 // 3], name="cut.jpg")


def test_truncated_png_is_refused_even_when_pillow_global_tolerates_truncation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _encode(_noise(64, 64))
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is restored


def test_png_header_claiming_100000_squared_is_refused_before_decoding() -> None:
    bomb = _handmade_png(100_000, 100_000, 8, 2, b"\x00" * 16)
    start = time.perf_counter()
    with pytest.raises(InputError, match="claims"):
        load_image(bomb, name="bomb.png")
    assert time.perf_counter() - start < 1.0


def test_image_over_max_pixels_is_refused_from_its_header_alone() -> None:
    # 3000x3000 is under Pillow's own limit, and the pixel data is garbage: the refusal must
    # come from our header check (it names the size), not from a failed decode.
    header_only = _handmade_png(3000, 3000, 8, 2, b"\x00" * 16)
    with pytest.raises(InputError, match=r"3000x3000 = 9000000 pixels, more than the limit"):
        load_image(header_only, max_pixels=1_000_000)


def test_max_pixels_leaves_pillow_global_limit_alone() -> None:
    before = Image.MAX_IMAGE_PIXELS
    load_image(_encode(_noise(8, 8)), max_pixels=100)
    after = Image.MAX_IMAGE_PIXELS
    assert after == before


def test_one_by_one_image_is_refused_as_too_small() -> None:
    with pytest.raises(InputError, match=r"1x1; an LR input needs at least 2x2"):
        load_image(_encode(Image.new("RGB", (1, 1))))


def test_refused_input_chains_the_original_pillow_error() -> None:
    data = _encode(_noise(64, 64))
    with pytest.raises(InputError) as info:
        load_image(data[: len(data) // 2])
    assert isinstance(info.value.__cause__, OSError)


# ---------------------------------------------------------------------------------------------
# Normalisation to RGB in [0, 1]


def test_rgb_png_loads_exactly_with_its_metadata() -> None:
    pixels = np.array(_noise(5, 3))
    data = _encode(Image.fromarray(pixels, "RGB"))
    loaded = load_image(data)
    assert isinstance(loaded, LoadedImage)
    assert loaded.tensor.dtype == torch.float32
    assert tuple(loaded.tensor.shape) == (3, 3, 5)
    assert (loaded.width, loaded.height) == (5, 3)
    assert (loaded.format, loaded.original_mode) == ("PNG", "RGB")
    assert loaded.conversions == []
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    assert torch.equal(loaded.tensor, expected)


def test_checksum_is_sha256_of_raw_bytes() -> None:
    import hashlib

    data = _encode(_noise(4, 4))
    assert load_image(data).checksum == hashlib.sha256(data).hexdigest()


def test_path_and_str_inputs_are_named_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "face.png"
    path.write_bytes(_encode(_noise(4, 4)))
    assert load_image(path).name == "face.png"
    assert load_image(str(path)).name == "face.png"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_common_formats_load(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    loaded = load_image(_encode(_noise(8, 6), fmt))
    assert loaded.format == fmt
    assert (loaded.width, loaded.height) == (8, 6)
    assert tuple(loaded.tensor.shape) == (3, 6, 8)


def test_sixteen_bit_png_is_scaled_from_65535_not_clipped() -> None:
    values = np.array([[0, 32768], [65535, 257 * 100]], dtype=np.uint16)
    loaded = load_image(_encode(Image.fromarray(values)))
    assert loaded.original_mode == "I;16"
    grey = loaded.tensor[0]
    assert grey[1, 0].item() == pytest.approx(1.0)
    assert grey[0, 1].item() == pytest.approx(0.5, abs=1e-4)
    assert grey[1, 1].item() == pytest.approx(100 / 255, abs=1e-6)
    assert torch.equal(loaded.tensor[0], loaded.tensor[2])
    assert any("0..65535" in c for c in loaded.conversions)


def test_sixteen_bit_colour_png_is_recorded_as_decoded_at_8_bits() -> None:
    pixel = struct.pack(">HHH", 40000, 0, 65535)
    rows = b"".join(b"\x00" + pixel * 2 for _ in range(2))  # filter byte, then 2 pixels
    loaded = load_image(_handmade_png(2, 2, 16, 2, rows))
    assert loaded.tensor[:, 0, 0].tolist() == pytest.approx([40000 / 65535, 0.0, 1.0], abs=1 / 255)
    assert "16 bits per channel decoded at 8 bits" in loaded.conversions


def test_rgba_is_composited_on_white() -> None:
    img = Image.new("RGBA", (2, 2), (255, 0, 0, 255))
    img.putpixel((1, 0), (255, 0, 0, 128))
    img.putpixel((0, 1), (0, 0, 0, 0))
    loaded = load_image(_encode(img))
    t = loaded.tensor
    assert t[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    half = 1.0 - 128 / 255
    assert t[:, 0, 1].tolist() == pytest.approx([1.0, half, half])
    assert t[:, 1, 0].tolist() == [1.0, 1.0, 1.0]
    assert loaded.original_mode == "RGBA"
    assert "RGBA alpha composited on white" in loaded.conversions


def test_fully_opaque_alpha_is_dropped_and_recorded() -> None:
    loaded = load_image(_encode(Image.new("RGBA", (2, 2), (10, 20, 30, 255))))
    assert loaded.tensor[:, 0, 0].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    assert "RGBA alpha dropped (fully opaque)" in loaded.conversions


def test_palette_image_is_converted_to_rgb() -> None:
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    loaded = load_image(_encode(img))
    assert loaded.original_mode == "P"
    assert loaded.tensor[:, 0, 0].tolist() == pytest.approx([10 / 255, 200 / 255, 30 / 255])
    assert loaded.conversions == ["palette -> RGB"]


def test_palette_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (2, 2), 0)
    img.putpalette([10, 200, 30, 0, 0, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    loaded = load_image(_encode(img, transparency=1))
    assert loaded.tensor[:, 0, 0].tolist() == pytest.approx([10 / 255, 200 / 255, 30 / 255])
    assert loaded.tensor[:, 0, 1].tolist() == [1.0, 1.0, 1.0]
    assert "transparency composited on white" in loaded.conversions


def test_greyscale_is_replicated_to_three_channels() -> None:
    loaded = load_image(_encode(Image.new("L", (3, 2), 77)))
    assert loaded.original_mode == "L"
    assert torch.allclose(loaded.tensor, torch.full((3, 2, 3), 77 / 255))
    assert loaded.conversions == ["greyscale -> RGB"]


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    red_in_cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    loaded = load_image(_encode(red_in_cmyk, "JPEG", quality=95))
    assert loaded.original_mode == "CMYK"
    assert loaded.tensor[:, 8, 8].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.05)
    assert any(c.startswith("CMYK -> RGB") for c in loaded.conversions)


def test_exif_orientation_6_swaps_size_and_rotates_pixels() -> None:
    # Stored 32 wide x 16 tall with a red block top-left; orientation 6 means "rotate 90
    # degrees clockwise to view", which takes the top-left corner to the top-right.
    img = Image.new("RGB", (32, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert (loaded.width, loaded.height) == (16, 32)
    assert loaded.tensor[:, 3, 12].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.1)
    assert loaded.tensor[:, 3, 3].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=0.1)
    assert "exif-orientation 6 applied" in loaded.conversions


def test_first_frame_of_animated_gif_is_used() -> None:
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    loaded = load_image(data)
    assert loaded.tensor[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert "first of 2 frames used" in loaded.conversions


# ---------------------------------------------------------------------------------------------
# Non-square inputs


def test_center_crop_takes_the_middle_of_the_longer_side() -> None:
    x = torch.arange(6, dtype=torch.float32).view(1, 1, 6).expand(3, 4, 6)  # column index
    out, record = fit_to_square(x, "center-crop")
    assert tuple(out.shape) == (3, 4, 4)
    assert out[0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert record == FitRecord(policy="center-crop", original=(6, 4), box=(1, 0, 5, 4))


def test_pad_replicates_edges_out_to_the_longer_side() -> None:
    x = torch.arange(2, dtype=torch.float32).view(1, 2, 1).expand(3, 2, 6)  # row index
    out, record = fit_to_square(x, "pad")
    assert tuple(out.shape) == (3, 6, 6)
    assert out[0, :, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert record.pad == (0, 2, 0, 2)
    assert record.box == (0, -2, 6, 4)


def test_none_policy_refuses_non_square_input() -> None:
    with pytest.raises(InputError, match="not square"):
        fit_to_square(torch.zeros(3, 4, 6), "none")


def test_unknown_fit_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="center-crop, pad, none"):
        fit_to_square(torch.zeros(3, 4, 4), "stretch")


def test_square_input_passes_fit_unchanged() -> None:
    x = torch.rand(3, 8, 8)
    out, record = fit_to_square(x)
    assert out is x
    assert not record.changed


# ---------------------------------------------------------------------------------------------
# LR sizes


def test_allowed_lr_sizes_are_divisors_up_to_half_the_resolution() -> None:
    assert allowed_lr_sizes(64) == [2, 4, 8, 16, 32]
    assert allowed_lr_sizes(96) == [2, 3, 4, 6, 8, 12, 16, 24, 32, 48]


def test_check_lr_size_returns_the_integer_factor() -> None:
    assert check_lr_size(16, 64) == 4
    assert check_lr_size(8, 1024) == 128


@pytest.mark.parametrize("size", [1, 20, 48, 64, 128])
def test_check_lr_size_error_lists_allowed_sizes(size: int) -> None:
    with pytest.raises(InputError, match=r"allowed LR sizes for 64x64 are 2, 4, 8, 16, 32"):
        check_lr_size(size, 64)


def test_prepare_input_crops_and_derives_the_factor() -> None:
    loaded = load_image(_encode(_noise(20, 16)), name="wide.png")
    prepared = prepare_input(loaded, 64)
    assert tuple(prepared.tensor.shape) == (3, 16, 16)
    assert (prepared.factor, prepared.lr_size, prepared.resolution) == (4, 16, 64)
    assert prepared.fit.box == (2, 0, 18, 16)
    assert torch.equal(prepared.tensor, loaded.tensor[:, :, 2:18])
    assert prepared.conversions[-1].startswith("20x16 centre-cropped to 16x16")


def test_prepare_input_refuses_a_large_square_image_instead_of_resizing() -> None:
    loaded = load_image(_encode(_noise(256, 256)), name="big.png")
    with pytest.raises(
        InputError, match=r"big\.png \(256x256\).*allowed LR sizes for 64x64 are 2, 4"
    ):
        prepare_input(loaded, 64)


# ---------------------------------------------------------------------------------------------
# Encoding and the contact sheet


def test_png_encode_round_trip_is_exact_for_8_bit_values() -> None:
    x = torch.from_numpy(np.array(_noise(7, 5))).permute(2, 0, 1).float() / 255.0
    assert torch.equal(load_image(encode_png(x)).tensor, x)


def test_png_metadata_is_written_as_text_chunks() -> None:
    data = encode_png(torch.zeros(3, 2, 2), metadata={"seed": "123"})
    assert Image.open(io.BytesIO(data)).text == {"seed": "123"}


def test_to_pil_clamps_and_rounds() -> None:
    x = torch.tensor([-0.5, 0.5, 2.0, float("nan")]).view(1, 1, 4).expand(3, 1, 4)
    assert list(np.asarray(to_pil(x))[0, :, 0]) == [0, 128, 255, 0]


def test_save_png_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = save_png(torch.rand(3, 4, 4), tmp_path / "out" / "sample-0.png")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["sample-0.png"]


def test_contact_sheet_has_one_column_per_image_and_two_rows() -> None:
    lr = _solid((1.0, 0.0, 0.0), 8, 8)
    samples = [_solid((0.0, 1.0, 0.0), 32, 32) for _ in range(3)]
    downs = [_solid((0.0, 0.0, 1.0), 8, 8) for _ in range(3)]
    sheet = contact_sheet(lr, samples, downs)
    assert sheet.size == (4 + 4 * (32 + 4), 4 + 2 * (32 + 4))
    assert sheet.getpixel((4 + 16, 4 + 16)) == (255, 0, 0)  # LR input, upscaled
    assert sheet.getpixel((40 + 16, 4 + 16)) == (0, 255, 0)  # sample 0
    assert sheet.getpixel((40 + 16, 40 + 16)) == (0, 0, 255)  # its downscale, upscaled
    assert sheet.getpixel((4 + 16, 40 + 16)) == (255, 255, 255)  # blank under the input


def test_contact_sheet_labels_add_a_strip_above_the_images() -> None:
    lr = torch.rand(3, 8, 8)
    samples, downs = [torch.rand(3, 64, 64)], [torch.rand(3, 8, 8)]
    plain = contact_sheet(lr, samples, downs)
    labelled = contact_sheet(lr, samples, downs, labels=["input 8x8", "sample 0 L2=0.0012 ok"])
    assert labelled.width == plain.width
    assert labelled.height > plain.height


def test_contact_sheet_refuses_mismatched_lists() -> None:
    with pytest.raises(ConfigError, match="2 samples but 1 downscales"):
        contact_sheet(torch.rand(3, 8, 8), [torch.rand(3, 32, 32)] * 2, [torch.rand(3, 8, 8)])


# ---------------------------------------------------------------------------------------------
# Bundled examples


@pytest.mark.parametrize(
    ("file", "factor"),
    [
        ("astronaut-16.png", 4),
        ("astronaut-8.png", 8),
        ("grace-hopper-16.png", 4),
        ("grace-hopper-8.png", 8),
    ],
)
def test_bundled_examples_are_valid_inputs_for_a_64px_generator(file: str, factor: int) -> None:
    path = EXAMPLES / "lr" / file
    if not path.is_file():
        pytest.skip(f"{path} not generated (run examples/make_examples.py)")
    prepared = prepare_input(load_image(path), 64, policy="none")
    assert prepared.factor == factor
    assert prepared.conversions == []


# ---------------------------------------------------------------------------------------------
# In-memory PIL images: the library path equals the file path


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (32, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _palette_png() -> bytes:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 200, 30, 0, 0, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    return _encode(img, transparency=1)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_exif_rotated_jpeg, id="exif-orientation"),
        pytest.param(
            lambda: _encode(Image.fromarray(np.array([[0, 65535], [257, 30000]], np.uint16))),
            id="16-bit-grey",
        ),
        pytest.param(
            lambda: _encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), id="cmyk"
        ),
        pytest.param(_palette_png, id="palette-transparency"),
        pytest.param(lambda: _encode(Image.new("RGBA", (4, 4), (255, 0, 0, 100))), id="rgba"),
        pytest.param(lambda: _encode(Image.new("L", (4, 4), 77)), id="grey"),
    ],
)
def test_a_pil_image_is_normalised_exactly_like_its_file(data) -> None:
    from pulse_core.imaging import image_from_pil

    raw = data()
    from_file = load_image(raw)
    from_pil = image_from_pil(Image.open(io.BytesIO(raw)))
    assert torch.equal(from_pil.tensor, from_file.tensor)
    assert from_pil.conversions == from_file.conversions and from_pil.conversions


def test_restore_reports_how_a_pil_image_was_normalised(demo_generator) -> None:
    from pulse_core import SearchConfig, restore

    img = Image.new("P", (8, 8), 0)
    img.putpalette([120, 90, 60] + [0] * 765)
    config = SearchConfig(steps=2)
    from_pil = restore(img, demo_generator, samples=1, config=config)
    from_tensor = restore(load_image(_encode(img)).tensor, demo_generator, samples=1, config=config)
    assert from_pil.conversions == ["palette -> RGB"]
    assert torch.equal(from_pil.samples[0].hr, from_tensor.samples[0].hr)
