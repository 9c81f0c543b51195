"""Hostile and malformed inputs run through the flow: each is a recorded failure or a restore.

A public archive holds whatever people uploaded: truncated and mislabelled files, files that are
not images at all, decompression bombs, odd colour modes, names in every alphabet, and, on a
shared disk or bucket, links and keys that try to reach outside the archive. The contract:
- every such input ends as one manifest row per sample with status "failed" and a reason, or
  as a valid restore (with its conversions recorded); none stops its batch, and the good inputs
  in the same batches are restored;
- nothing outside dest is written, and nothing outside source is read (a symbolic link that
  leads out of a local source is refused, with the reason; on S3, a key whose `..` segments
  would leave the prefix is refused the same way).

The corpus is built by the test (`hostile_corpus`), batches mix good and bad inputs (4 per
task), and a snapshot of everything outside dest is compared before and after the run.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers import moto_server, run_restore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"
SEARCH = {"steps": 3, "samples": 1, "preset": "reference"}  # the pipeline is under test, not PULSE
RUN = {**SEARCH, "inputs_per_task": 4}  # every batch mixes good and bad inputs


# --------------------------------------------------------------------------------------------
# Building hostile files


def face() -> Image.Image:
    return Image.open(EXAMPLES / "astronaut-16.png").convert("RGB")  # 16x16, an allowed LR size


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: Pillow cannot write 48-bit RGB or lie about dimensions."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def rgb16_png() -> bytes:
    """16x16 RGB at 16 bits per channel (48-bit), from the face."""
    pixels = np.asarray(face(), dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return raw_png(16, 16, 16, 2, rows)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is rewritten to claim width x height."""
    data = bytearray(encode(face(), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A 24-bit BMP header claiming width x height, followed by a few bytes of pixels."""
    header = struct.pack("<2sIHHI", b"BM", 54 + 64, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 64, 2835, 2835, 0, 0)
    return header + info + b"\x80" * 64


def jpeg_with_broken_exif() -> bytes:
    """A JPEG with an APP1 "Exif" segment whose TIFF structure is garbage."""
    data = encode(face(), "JPEG", quality=90)
    garbage = b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xf0" + bytes(range(40))
    app1 = b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage
    return data[:2] + app1 + data[2:]


def animated_gif() -> bytes:
    first, second = face(), face().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def png_with_bad_crc() -> bytes:
    data = bytearray(encode(face(), "PNG"))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    data[idat + 4 + length] ^= 0xFF  # first byte of IDAT's CRC
    return bytes(data)


def float_tiff() -> bytes:
    grey = np.asarray(face().convert("L"), dtype=np.float32) / 255.0
    return encode(Image.fromarray(grey, mode="F"), "TIFF")


def tiff_with_bad_ifd() -> bytes:
    return b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + b"\x00" * 32


@dataclass(frozen=True)
class Expect:
    """What the run must record for one input."""

    status: str  # "ok" or "failed"
    words: tuple[str, ...] = ()  # in the reason (failed) or the conversions (ok)


OK = Expect("ok")


def failed(*words: str) -> Expect:
    return Expect("failed", words)


def secret_png() -> bytes:
    """The file outside the source that links point at: a valid input, unlike any other."""
    return encode(face().transpose(Image.Transpose.ROTATE_90), "PNG")


def hostile_files() -> dict[str, tuple[bytes, Expect]]:
    """Regular files of the corpus: name -> (bytes, what the run must record)."""
    png = encode(face(), "PNG")
    jpeg = encode(face(), "JPEG", quality=90)
    rng = random.Random(9)
    return {
        "plain.png": (png, OK),
        "cut-png.png": (png[: len(png) // 2], failed("truncated")),
        # Pillow cannot even open these two, so their reason is "not a readable image" or "header
        # cannot be read" rather than "truncated": still a failed row with a reason.
        "cut-jpeg.jpg": (jpeg[: len(jpeg) // 2], failed()),
        "cut-webp.webp": (encode(face(), "WEBP")[:40], failed()),
        "empty.png": (b"", failed("empty", "0 bytes")),
        "text-as.jpg": (b"meeting notes, not a photo\n" * 8, failed("not a readable image")),
        "html-as.png": (b"<!doctype html><html><body>hi</body></html>", failed("not a readable")),
        "svg-as.png": (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"/>',
            failed("not a readable image"),
        ),
        "random-bytes.png": (rng.randbytes(2048), failed("not a readable image")),
        "png-named.gif": (png, OK),  # content decides the format, not the extension
        "webp-named.jpg": (encode(face(), "WEBP", lossless=True), OK),
        "bomb.png": (raw_png(100_000, 100_000, 8, 2, b"\0" * 64), failed("pixels")),
        "huge-header.jpg": (jpeg_claiming(60_000, 60_000), failed("pixels")),
        "huge-bmp-header.bmp": (bmp_claiming(40_000, 40_000), failed("pixels")),
        "zero-size.png": (raw_png(0, 0, 8, 2, b""), failed()),
        "one-pixel.png": (encode(Image.new("RGB", (1, 1)), "PNG"), failed("at least 2x2")),
        "bad-crc.png": (png_with_bad_crc(), OK),  # Pillow does not check IDAT's CRC: pixels intact
        "bad-ifd.tif": (tiff_with_bad_ifd(), failed()),
        "animated.gif": (animated_gif(), Expect("ok", ("first of 2 frames used",))),
        "broken-exif.jpg": (jpeg_with_broken_exif(), OK),
        "cmyk.jpg": (encode(face().convert("CMYK"), "JPEG", quality=90), Expect("ok", ("CMYK",))),
        "rgb16.png": (rgb16_png(), Expect("ok", ("16 bits per channel",))),
        "grey16.png": (
            encode(Image.fromarray(np.asarray(face().convert("L"), np.uint16) * 257), "PNG"),
            Expect("ok", ("16-bit greyscale",)),
        ),
        "float.tif": (float_tiff(), Expect("ok", ("32-bit float",))),
        "фото ü 😀.png": (png, OK),  # unicode and spaces
        "name with  spaces .png": (png, OK),
        "x..png": (png, OK),  # dots before the extension: output folder "x."
        "dots..in..folder/face.png": (png, OK),
        "folder.png/inside.png": (png, OK),  # a folder named like an image is a folder
    }


def build_local_corpus(root: Path) -> tuple[Path, Path, dict[str, Expect]]:
    """source/ (the corpus), outside/ (what links point at); returns (source, outside, expect)."""
    source, outside = root / "source", root / "outside"
    outside.mkdir(parents=True)
    (outside / "secret.png").write_bytes(secret_png())  # a valid image: must not be read
    expect: dict[str, Expect] = {}
    for name, (data, what) in hostile_files().items():
        path = source / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[name] = what
    (source / "link-outside.png").symlink_to(outside / "secret.png")
    expect["link-outside.png"] = failed("outside")
    (source / "link-inside.png").symlink_to(source / "plain.png")
    expect["link-inside.png"] = OK
    (source / "link-dangling.png").symlink_to(source / "missing.png")
    expect["link-dangling.png"] = failed("not found")
    (source / "folder-link.png").symlink_to(outside, target_is_directory=True)  # not an input
    (source / "empty-folder.png").mkdir()  # a folder named like an image: not an input
    if hasattr(os, "mkfifo"):
        os.mkfifo(source / "pipe.png")  # reading it would block forever
        expect["pipe.png"] = failed("FIFO")
    return source, outside, expect


# --------------------------------------------------------------------------------------------
# Snapshots: nothing outside dest changes


def snapshot(root: Path, skip: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under `root` but `skip`: kind, size and content hash (links not followed)."""
    found: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in [*dirnames, *filenames]:
            path = here / name
            st = path.lstat()
            if path.is_symlink():
                found[str(path)] = ("link", 0, os.readlink(path))
            elif path.is_dir():
                found[str(path)] = ("dir", 0, "")
            elif path.is_file():
                found[str(path)] = (
                    "file",
                    st.st_size,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
            else:
                found[str(path)] = ("special", 0, "")
    return found


# --------------------------------------------------------------------------------------------
# Fixtures


@dataclass
class LocalRun:
    source: Path
    dest: Path
    expect: dict[str, Expect]
    before: dict[str, tuple[str, int, str]]
    after: dict[str, tuple[str, int, str]]
    siblings_before: list[str]
    siblings_after: list[str]
    summary: Any
    rows: dict[str, dict[str, Any]]  # input key -> its row in the run's samples.parquet
    index: pa.Table  # the raw index folder, no dedup applied


@pytest.fixture(scope="module")
def local_run(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    root = tmp_path_factory.mktemp("hostile")
    source, _, expect = build_local_corpus(root)
    dest = root / "dest"
    siblings_before = sorted(os.listdir(root.parent))
    before = snapshot(root, skip=dest)

    summary = run_restore(str(source), str(dest), max_failures=len(expect), **RUN)

    after = snapshot(root, skip=dest)
    samples = pq.read_table(dest / "_runs" / summary.run_id / "samples.parquet")
    rows = {r["input_key"]: r for r in samples.to_pylist()}
    index = ds.dataset(dest / "_manifest" / "samples", format="parquet").to_table()
    return LocalRun(
        source,
        dest,
        expect,
        before,
        after,
        siblings_before,
        sorted(os.listdir(root.parent)),
        summary,
        rows,
        index,
    )


# --------------------------------------------------------------------------------------------
# Specs: a local source


def test_the_corpus_is_large_and_every_input_is_recorded_once(local_run: LocalRun) -> None:
    assert len(local_run.expect) >= 25
    assert set(local_run.rows) == set(local_run.expect)  # no more (folders), no fewer
    # Each input fails for its own reason, not because two names share an output folder.
    assert not [k for k, r in local_run.rows.items() if "also derived from" in (r["error"] or "")]
    keys = local_run.index["input_key"].to_pylist()
    assert sorted(keys) == sorted(local_run.expect)  # one row per input (1 sample each)
    assert local_run.summary.found == len(local_run.expect)


def test_every_bad_input_is_a_failed_row_with_its_reason(local_run: LocalRun) -> None:
    for name, want in local_run.expect.items():
        if want.status != "failed":
            continue
        row = local_run.rows[name]
        assert row["status"] == "failed", f"{name} was restored"
        assert row["error"], f"{name}: no reason recorded"
        for word in want.words:
            assert word in row["error"], f"{name}: {word!r} not in {row['error']!r}"
        assert row["output_key"] is None


def test_every_good_input_is_restored_beside_the_bad_ones(local_run: LocalRun) -> None:
    for name, want in local_run.expect.items():
        if want.status != "ok":
            continue
        row = local_run.rows[name]
        assert row["status"] == "ok", f"{name}: {row['error']}"
        assert (local_run.dest / row["output_key"]).is_file()
        conversions = " | ".join(row["conversions"] or [])
        for word in want.words:
            assert word in conversions, f"{name}: {word!r} not in {conversions!r}"
    ok = sum(w.status == "ok" for w in local_run.expect.values())
    assert (local_run.summary.ok, local_run.summary.failed) == (ok, len(local_run.expect) - ok)


def test_a_link_out_of_the_source_is_refused_and_its_target_never_read(
    local_run: LocalRun,
) -> None:
    row = local_run.rows["link-outside.png"]
    assert row["status"] == "failed" and "outside" in row["error"]
    assert row["input_checksum"] is None  # refused before a byte was read
    secret = hashlib.sha256(secret_png()).hexdigest()
    read = {r["input_checksum"] for r in local_run.rows.values()} - {None}
    assert local_run.rows["plain.png"]["input_checksum"] in read  # checksums are recorded...
    assert secret not in read  # ...and the outside file's is nowhere: it was never read
    assert "folder-link.png" not in local_run.rows  # a link to a folder is not walked
    assert "empty-folder.png" not in local_run.rows  # a folder named like an image is a folder


def test_nothing_outside_dest_changes(local_run: LocalRun) -> None:
    assert local_run.after == local_run.before
    assert local_run.siblings_after == local_run.siblings_before


# --------------------------------------------------------------------------------------------
# Specs: S3 sources


def _s3_client(endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1") -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(s3={"addressing_style": "path"}),
    )


def bucket_snapshot(client: Any, bucket: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return keys


def _point_aws_chain_at(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3: unlike SeaweedFS, it stores keys with `.` and `..` segments, as AWS does."""
    with moto_server() as endpoint:
        _point_aws_chain_at(
            monkeypatch,
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing-secret",
                "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )
        yield endpoint


def test_s3_keys_with_dot_segments_cannot_reach_outside_dest(prefect_harness, moto_s3: str) -> None:
    """AWS S3 stores `a/../../x.png` as a key like any other; it must not lead out of dest.

    SeaweedFS refuses such keys on upload (InvalidRequest), so this spec runs on moto, which
    keeps them as AWS does; the SeaweedFS spec below covers the names SeaweedFS accepts.
    """
    client = _s3_client(moto_s3, "testing", "testing-secret")
    client.create_bucket(Bucket="archive")
    png = encode(face(), "PNG")
    escaping = ["a/../../x.png", "../up.png", "a/./b.png", "a//double.png", "a/../../../../etc.png"]
    for key in [*escaping, "good-1.png", "sub/good-2.png", "good-3.png"]:
        client.put_object(Bucket="archive", Key=f"in/{key}", Body=png)
    client.put_object(Bucket="archive", Key="x.png", Body=b"must stay as it is")
    before = bucket_snapshot(client, "archive")

    summary = run_restore("s3://archive/in", "s3://archive/out", max_failures=len(escaping), **RUN)

    after = bucket_snapshot(client, "archive")
    outside_dest = {k: v for k, v in after.items() if not k.startswith("out/")}
    assert outside_dest == before  # not one key written, changed or deleted outside dest
    status = {i.input_key: (i.status, i.error or "") for i in summary.inputs}
    for key in escaping:
        assert status[key][0] == "failed", key
        assert "segment" in status[key][1], status[key][1]  # validate_key's reason
    for key in ("good-1.png", "sub/good-2.png", "good-3.png"):
        assert status[key] == ("ok", ""), status[key]
        assert f"out/{key.rsplit('.', 1)[0]}/sample-0.png" in after
    index_keys = [k for k in after if k.startswith("out/_manifest/samples/")]
    rows = pa.concat_tables(
        [
            pq.read_table(io.BytesIO(client.get_object(Bucket="archive", Key=k)["Body"].read()))
            for k in index_keys
        ]
    )
    assert sorted(rows["input_key"].to_pylist()) == sorted(status)


def test_s3_hostile_names_on_seaweedfs_fail_alone_or_restore(
    prefect_harness, seaweedfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hostile corpus's files as objects in a real SeaweedFS bucket: same contract."""
    prefix = f"hostile-{uuid.uuid4().hex[:8]}"
    client = _s3_client(seaweedfs.endpoint_url, seaweedfs.access_key, seaweedfs.secret_key)
    expect: dict[str, Expect] = {}
    for name, (data, want) in hostile_files().items():
        client.put_object(Bucket="pulse-source", Key=f"{prefix}/{name}", Body=data)
        expect[name] = want
    before_source = bucket_snapshot(client, "pulse-source")
    before_dest = {
        k: v
        for k, v in bucket_snapshot(client, "pulse-dest").items()
        if not k.startswith(f"{prefix}/")
    }
    _point_aws_chain_at(monkeypatch, seaweedfs.env())

    summary = run_restore(
        seaweedfs.url("pulse-source", prefix),
        seaweedfs.url("pulse-dest", prefix),
        max_failures=len(expect),
        **RUN,
    )

    status = {i.input_key: i for i in summary.inputs}
    assert set(status) == set(expect)
    for name, want in expect.items():
        got = status[name]
        assert got.status == want.status, f"{name}: {got.error}"
        text = got.error if want.status == "failed" else " | ".join(got.conversions)
        for word in want.words:
            assert word in (text or ""), f"{name}: {word!r} not in {text!r}"
    assert bucket_snapshot(client, "pulse-source") == before_source
    after_dest = bucket_snapshot(client, "pulse-dest")
    assert {k: v for k, v in after_dest.items() if not k.startswith(f"{prefix}/")} == before_dest


# --------------------------------------------------------------------------------------------
# Names whose output folder cannot exist


OUTPUT_LESS_NAMES = {  # name -> the output folder `render.output_base` derives from it
    ".png": "",  # only an extension: no stem at all
    "..png": ".",
    "...png": "..",  # would be dest's parent, were keys not validated
    "sub/.png": "sub/",
}


def test_names_without_a_valid_output_folder_are_failed_rows(prefect_harness, tmp_path) -> None:
    source, dest = tmp_path / "source", tmp_path / "dest"
    png = encode(face(), "PNG")
    for name in [*OUTPUT_LESS_NAMES, "good.png"]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(png)
    before = snapshot(tmp_path, skip=dest)

    summary = run_restore(str(source), str(dest), max_failures=len(OUTPUT_LESS_NAMES), **RUN)

    assert snapshot(tmp_path, skip=dest) == before
    status = {i.input_key: i for i in summary.inputs}
    assert status["good.png"].status == "ok"
    for name in OUTPUT_LESS_NAMES:
        assert status[name].status == "failed" and status[name].error, name
