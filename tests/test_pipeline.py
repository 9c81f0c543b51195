"""The restore-archive flow end to end, against a real S3 server and a temporary Prefect API.

Each test is one behaviour of the pipeline as a user or an operator sees it: what lands in dest,
what a re-run redoes, how bad inputs and bad storage settings are reported. The Prefect API
starts once for the module (`prefect_harness`); runs that several specs read (a restored folder,
a run over bad inputs) are made once per module too, and tests that change a dest work on a copy.
Searches are tiny (3 steps, 1-2 samples): these specs are about the pipeline, not the search.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.restore import TooManyFailures
from pulse_cli.main import main
from pulse_core.errors import StorageError
from tests.helpers import run_restore
from tests.prefect_server import drain_prefect_workers

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lr"
EXAMPLE_KEYS = ("astronaut-16.png", "astronaut-8.png", "grace-hopper-16.png", "grace-hopper-8.png")
# A search just long enough to exercise every code path, with the paper's settings so that each
# input has exactly `samples` rows (the default preset adds rows for extra restarts).
FAST = {"steps": 3, "samples": 2, "preset": "reference"}


def run_key(dest: Path | str) -> str:
    """The artifact key prefix of a job writing to `dest` (flows.report.job_key)."""
    from flows.report import job_key
    from pulse_core.storage import open_storage

    return job_key(open_storage(str(dest)).url)


# --------------------------------------------------------------------------------------------
# Fixtures: one Prefect API per module, runs shared by several specs


def index_of(dest: Path) -> pa.Table:
    """The raw index folder of a local dest, read as one dataset (no dedup applied)."""
    return ds.dataset(dest / "_manifest" / "samples", format="parquet").to_table()


def identities(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table["input_key"].to_pylist(), table["sample_index"].to_pylist(), strict=True))


@pytest.fixture(scope="module")
def restored_folder(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/lr restored once (2 samples each) into a folder; tests copy it before changing it."""
    dest = tmp_path_factory.mktemp("restored") / "dest"
    summary = run_restore(str(EXAMPLES), str(dest), **FAST)
    assert (summary.ok, summary.failed) == (len(EXAMPLE_KEYS), 0)
    return dest


def copy_of(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "dest"
    shutil.copytree(folder, copy)
    return copy


# --------------------------------------------------------------------------------------------
# Inputs of every kind, made from the example faces


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **options)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a token IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def good_inputs() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, words the manifest's conversions must contain)."""
    face = Image.open(EXAMPLES / "astronaut-16.png").convert("RGB")  # 16x16
    rgba = face.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((16, 16)))  # really transparent somewhere
    wide = Image.new("RGB", (16, 24), "white")  # portrait 16x24 -> centre-cropped to 16x16
    wide.paste(face, (0, 4))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    grey16 = Image.fromarray(np.asarray(face.convert("L"), dtype=np.uint16) * 257)  # I;16
    return {
        "plain.png": (_png(face), ""),
        "cmyk.jpg": (_jpeg(face.convert("CMYK")), "CMYK -> RGB"),
        "grey16.png": (_png(grey16), "16-bit greyscale"),
        "rgba.png": (_png(rgba), "alpha composited on white"),
        "palette.png": (_png(face.convert("P")), "palette -> RGB"),
        "grey8.png": (_png(face.convert("L").resize((8, 8))), "greyscale -> RGB"),
        "rotated.jpg": (_jpeg(face, exif=exif), "exif-orientation 6 applied"),
        "portrait.png": (_png(wide), "centre-cropped to 16x16"),
    }


def bad_inputs() -> dict[str, tuple[bytes, tuple[str, ...]]]:
    """file name -> (bytes, words the failure reason must contain)."""
    face = _png(Image.open(EXAMPLES / "astronaut-16.png").convert("RGB"))
    return {
        "empty.png": (b"", ("empty", "0 bytes")),
        "truncated.png": (face[: len(face) // 2], ("truncated",)),
        "notes.jpg": (b"meeting notes, not a photo\n" * 8, ("not a readable image",)),
        "dot.png": (_png(Image.new("RGB", (1, 1))), ("1x1", "at least 2x2")),
        "bomb.png": (_png_header_only(100_000, 100_000), ("pixels", "decompression bomb")),
        "odd-size.png": (
            _png(Image.open(EXAMPLES / "astronaut-16.png").resize((12, 12))),
            ("12x12", "allowed LR sizes"),
        ),
    }


@dataclass
class BadInputsRun:
    """A run over a folder mixing good and bad inputs, with max_failures below the bad count."""

    source: Path
    dest: Path
    flow_run_id: str
    state: Any  # the flow's final Prefect state (Failed: TooManyFailures)
    samples: pa.Table  # dest/_runs/<run>/samples.parquet


@pytest.fixture(scope="module")
def bad_inputs_run(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> BadInputsRun:
    root = tmp_path_factory.mktemp("bad-inputs")
    source, dest = root / "source", root / "dest"
    source.mkdir()
    for name, (data, _) in {**good_inputs(), **bad_inputs()}.items():
        (source / name).write_bytes(data)
    state = run_restore(
        str(source),
        str(dest),
        steps=3,
        samples=1,
        preset="reference",
        max_failures=1,
        return_state=True,
    )
    run_id = str(state.state_details.flow_run_id)
    samples = pq.read_table(dest / "_runs" / run_id / "samples.parquet")
    return BadInputsRun(source, dest, run_id, state, samples)


def read_artifact(flow_run_id: str, key: str) -> Any:
    """The newest artifact with `key` that the flow run `flow_run_id` created.

    The run creates each key once, but the client retries a create that the temporary SQLite API
    answered with 503 "database is locked" after committing it, so a busy machine can show two
    identical versions of one artifact; every version must carry the same content.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]),
            )
        )
    assert found, f"no {key!r} artifact for run {flow_run_id}"
    assert len({(a.type, str(a.data)) for a in found}) == 1, f"{key!r} versions differ: {found}"
    return max(found, key=lambda a: a.created)


# --------------------------------------------------------------------------------------------
# S3 to S3


def _s3_client(server: Any) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(s3={"addressing_style": "path"}),
    )


def _s3_keys(client: Any, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
    return keys


def _credentials_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Point the AWS credential chain at `env` only (no profile, no second endpoint)."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_s3_to_s3_run_writes_samples_checks_and_manifests_readable_with_pyarrow(
    prefect_harness, seaweedfs, monkeypatch
):
    import pyarrow.fs as pafs

    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    client = _s3_client(seaweedfs)
    inputs = {  # key under the source prefix -> example file
        "astronaut-16.png": "astronaut-16.png",
        "astronaut-8.png": "astronaut-8.png",
        "1950s/grace-hopper-16.png": "grace-hopper-16.png",
        "1950s/grace-hopper-8.png": "grace-hopper-8.png",
    }
    for key, name in inputs.items():
        client.put_object(
            Bucket="pulse-source", Key=f"{prefix}/{key}", Body=(EXAMPLES / name).read_bytes()
        )
    _credentials_from_env(monkeypatch, seaweedfs.env())

    summary = run_restore(
        seaweedfs.url("pulse-source", prefix) + "/",
        seaweedfs.url("pulse-dest", prefix) + "/",
        **FAST,
    )

    assert (summary.found, summary.attempted, summary.ok, summary.failed) == (4, 4, 4, 0)
    run = summary.run_id
    assert summary.samples_key == f"s3://pulse-dest/{prefix}/_runs/{run}/samples.parquet"
    written = _s3_keys(client, "pulse-dest", f"{prefix}/")
    expected = {
        f"_runs/{run}/{name}" for name in ("samples.parquet", "losses.parquet", "lease.json")
    }
    for key in inputs:
        stem = key.rsplit(".", 1)[0]
        expected.add(f"{stem}/sheet.png")
        for k in range(FAST["samples"]):
            expected |= {f"{stem}/sample-{k}.png", f"{stem}/sample-{k}-lr.png"}
    assert expected <= written
    assert not [k for k in written if "/parts/" in k], "batch parts are merged, then deleted"
    for key in inputs:  # HR at the generator's size; its LR check at the input's size
        stem, lr_side = key.rsplit(".", 1)[0], int(key.rsplit("-", 1)[1].split(".")[0])
        hr = client.get_object(Bucket="pulse-dest", Key=f"{prefix}/{stem}/sample-0.png")
        lr = client.get_object(Bucket="pulse-dest", Key=f"{prefix}/{stem}/sample-0-lr.png")
        assert Image.open(io.BytesIO(hr["Body"].read())).size == (64, 64)
        assert Image.open(io.BytesIO(lr["Body"].read())).size == (lr_side, lr_side)

    endpoint = urlsplit(seaweedfs.endpoint_url)
    fs = pafs.S3FileSystem(
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme,
        region=seaweedfs.region,
    )
    index = ds.dataset(
        f"pulse-dest/{prefix}/_manifest/samples", format="parquet", filesystem=fs
    ).to_table()
    assert sorted(identities(index)) == sorted(
        (key, k) for key in inputs for k in range(FAST["samples"])
    )
    assert set(index["status"].to_pylist()) == {"ok"}
    assert set(index["run_id"].to_pylist()) == {run}
    losses = pq.read_table(f"pulse-dest/{prefix}/_runs/{run}/losses.parquet", filesystem=fs)
    samples = pq.read_table(f"pulse-dest/{prefix}/_runs/{run}/samples.parquet", filesystem=fs)
    assert losses.num_rows == sum(samples["steps_run"].to_pylist()) > 0


# --------------------------------------------------------------------------------------------
# Resumability and idempotence


def test_rerun_of_a_finished_dest_does_nothing(restored_folder, tmp_path):
    dest = copy_of(restored_folder, tmp_path)
    before = sorted(p.relative_to(dest) for p in dest.rglob("*.png"))

    summary = run_restore(str(EXAMPLES), str(dest), **FAST)

    assert (summary.found, summary.skipped, summary.attempted) == (4, 4, 0)
    assert summary.samples_key == ""  # no run manifest for a run that restored nothing
    assert sorted(p.relative_to(dest) for p in dest.rglob("*.png")) == before


def test_rerun_redoes_only_the_input_whose_output_is_missing(restored_folder, tmp_path):
    dest = copy_of(restored_folder, tmp_path)
    (dest / "astronaut-16" / "sample-1.png").unlink()

    summary = run_restore(str(EXAMPLES), str(dest), **FAST)

    assert (summary.attempted, summary.skipped, summary.ok) == (1, 3, 1)
    assert [k for k, _ in summary.failures] == []
    assert (dest / "astronaut-16" / "sample-1.png").is_file()
    index = index_of(dest)
    assert sorted(identities(index)) == sorted(
        (key, k) for key in EXAMPLE_KEYS for k in range(FAST["samples"])
    ), "one row per (input, sample): the superseded rows were reconciled away"
    redone = {r["input_key"] for r in index.to_pylist() if r["run_id"] == summary.run_id}
    assert redone == {"astronaut-16.png"}


def test_force_redoes_every_input_without_duplicating_index_rows(restored_folder, tmp_path):
    dest = copy_of(restored_folder, tmp_path)

    summary = run_restore(str(EXAMPLES), str(dest), force=True, **FAST)

    assert (summary.attempted, summary.skipped, summary.ok) == (4, 0, 4)
    index = index_of(dest)
    keys = identities(index)
    assert len(keys) == len(set(keys)) == len(EXAMPLE_KEYS) * FAST["samples"]
    assert set(index["run_id"].to_pylist()) == {summary.run_id}
    assert len(list((dest / "_runs").glob("*/samples.parquet"))) == 2  # history is kept


@pytest.mark.parametrize("dest_name", [".", "restored"], ids=["dest-is-source", "dest-in-source"])
def test_outputs_written_inside_the_source_are_never_taken_for_inputs(
    prefect_harness, tmp_path, dest_name
):
    archive = tmp_path / "archive"
    shutil.copytree(EXAMPLES, archive)
    dest = archive / dest_name
    first = run_restore(str(archive), str(dest), steps=3, samples=1, preset="reference")

    again = run_restore(str(archive), str(dest), steps=3, samples=1, preset="reference")

    assert (first.found, first.ok) == (4, 4)
    assert (again.found, again.skipped, again.attempted) == (4, 4, 0)


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_every_good_input_is_restored_whatever_its_encoding(bad_inputs_run):
    rows = {r["input_key"]: r for r in bad_inputs_run.samples.to_pylist()}
    for name, (_, conversion) in good_inputs().items():
        row = rows[name]
        assert row["status"] == "ok", f"{name}: {row['error']}"
        assert conversion in " | ".join(row["conversions"]), (name, row["conversions"])
        stem = name.rsplit(".", 1)[0]
        assert (bad_inputs_run.dest / stem / "sample-0.png").is_file()
        assert (bad_inputs_run.dest / stem / "sheet.png").is_file()
    assert rows["portrait.png"]["fit_box"] == {"left": 0, "top": 4, "right": 16, "bottom": 20}
    assert rows["grey8.png"]["lr_width"] == 8 and rows["grey8.png"]["factor"] == 8


def test_every_bad_input_is_a_failed_row_with_its_reason(bad_inputs_run):
    rows = {r["input_key"]: r for r in bad_inputs_run.samples.to_pylist()}
    assert set(rows) == set(good_inputs()) | set(bad_inputs())
    for name, (_, words) in bad_inputs().items():
        row = rows[name]
        assert row["status"] == "failed" and row["output_key"] is None
        for word in words:
            assert word in row["error"], f"{name}: {word!r} not in {row['error']!r}"
        assert not (bad_inputs_run.dest / name.rsplit(".", 1)[0]).exists()


def test_too_many_failures_fail_the_run_only_after_everything_is_written(bad_inputs_run):
    state = bad_inputs_run.state
    assert state.is_failed()
    with pytest.raises(TooManyFailures, match=r"6 input\(s\) failed \(max_failures=1\)"):
        state.result()
    run_dir = bad_inputs_run.dest / "_runs" / bad_inputs_run.flow_run_id
    assert (run_dir / "samples.parquet").is_file() and (run_dir / "losses.parquet").is_file()
    assert not list(run_dir.glob("parts/*")), "parts were merged before the run failed"
    index = index_of(bad_inputs_run.dest)
    assert index.num_rows == len(good_inputs()) + len(bad_inputs())


def test_report_artifact_lists_every_failed_input_with_its_reason(bad_inputs_run):
    key = run_key(bad_inputs_run.dest)
    report = read_artifact(bad_inputs_run.flow_run_id, f"{key}-report").data
    assert "## Failures" in report
    failures = report.split("## Failures", 1)[1].split("\n## ", 1)[0]
    for name, (_, words) in bad_inputs().items():
        line = next(line for line in failures.splitlines() if f"`{name}`" in line)
        assert words[0] in line
    for name in good_inputs():
        assert f"`{name}`" not in failures


def test_run_publishes_progress_table_and_report_artifacts(bad_inputs_run):
    run, key = bad_inputs_run.flow_run_id, run_key(bad_inputs_run.dest)
    progress = read_artifact(run, f"{key}-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    table = read_artifact(run, f"{key}-results")
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    status = {r["input"]: r["status"] for r in rows}
    assert [r["status"] for r in rows] == sorted(
        (r["status"] for r in rows), key=lambda s: s == "ok"
    )
    assert {r["eps"] for r in rows} == {2e-3}
    assert status == {
        **dict.fromkeys(good_inputs(), "ok"),
        **dict.fromkeys(bad_inputs(), "failed"),
    }
    report = read_artifact(run, f"{key}-report")
    assert report.type == "markdown" and f"# Restore run {run}" in report.data


def test_failed_inputs_are_retried_by_the_next_run_and_tolerated_up_to_max_failures(
    bad_inputs_run, tmp_path
):
    dest = copy_of(bad_inputs_run.dest, tmp_path)

    summary = run_restore(
        str(bad_inputs_run.source),
        str(dest),
        steps=3,
        samples=1,
        preset="reference",
        max_failures=len(bad_inputs()),
    )

    assert summary.skipped == len(good_inputs())
    assert summary.attempted == summary.failed == len(bad_inputs())
    assert {k for k, _ in summary.failures} == set(bad_inputs())


def test_a_run_within_max_failures_is_named_and_logs_each_failed_input(bad_inputs_run, tmp_path):
    """Green, but distinguishable at a glance in the runs list, and the log names the inputs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    dest = copy_of(bad_inputs_run.dest, tmp_path)
    state = run_restore(
        str(bad_inputs_run.source),
        str(dest),
        steps=3,
        samples=1,
        preset="reference",
        max_failures=len(bad_inputs()),
        return_state=True,
    )

    assert state.is_completed() and state.name == "CompletedWithFailures"
    assert state.message == f"0 ok, {len(bad_inputs())} failed, {len(good_inputs())} skipped"
    flow_run_id = state.state_details.flow_run_id
    drain_prefect_workers()  # logs reach the API from a background worker
    wanted = [f"failed input {name}:" for name in bad_inputs()]
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
        logged = "\n".join(entry.message for entry in logs)
        missing = [w for w in wanted if w not in logged]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert missing == [], logged


def test_a_run_with_nothing_to_do_says_so_and_keeps_the_last_results(restored_folder, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    dest = copy_of(restored_folder, tmp_path)
    first = run_restore(str(EXAMPLES), str(dest), force=True, return_state=True, **FAST)
    again = run_restore(str(EXAMPLES), str(dest), return_state=True, **FAST)

    assert first.message.startswith(f"{len(EXAMPLE_KEYS)} ok, 0 failed")
    assert again.is_completed() and again.message.startswith("nothing to do")
    key = f"{run_key(dest)}-results"
    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert [str(a.flow_run_id) for a in latest] == [str(first.state_details.flow_run_id)]


def test_each_destination_keeps_its_own_artifact_history():
    from flows.report import job_key

    nightly, adhoc = job_key("s3://archive/restored"), job_key("s3://archive/adhoc")
    assert nightly != adhoc and nightly.startswith("restore-s3-archive-restored-")
    assert job_key("s3://archive/restored/") == nightly
    assert job_key("x", deployment="nightly-restore").startswith("restore-nightly-restore-")
    assert all(c.islower() or c.isdigit() or c == "-" for c in job_key("/Tmp/Ä B_c"))


# --------------------------------------------------------------------------------------------
# Storage settings


def test_wrong_credentials_fail_clearly_before_any_work(prefect_harness, seaweedfs, monkeypatch):
    prefix = f"badcreds-{uuid.uuid4().hex[:8]}"
    client = _s3_client(seaweedfs)
    client.put_object(
        Bucket="pulse-source",
        Key=f"{prefix}/astronaut-8.png",
        Body=(EXAMPLES / "astronaut-8.png").read_bytes(),
    )
    wrong_secret = "not-the-secret-" + uuid.uuid4().hex
    _credentials_from_env(monkeypatch, {**seaweedfs.env(), "AWS_SECRET_ACCESS_KEY": wrong_secret})

    with pytest.raises(StorageError, match="access denied") as caught:
        run_restore(
            seaweedfs.url("pulse-source", prefix), seaweedfs.url("pulse-dest", prefix), **FAST
        )

    message = str(caught.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and wrong_secret not in message
    assert _s3_keys(client, "pulse-dest", f"{prefix}/") == set()


@pytest.mark.parametrize("missing", ["source", "dest"])
def test_a_missing_bucket_fails_clearly_before_any_work(
    prefect_harness, seaweedfs, monkeypatch, missing
):
    prefix = f"nobucket-{uuid.uuid4().hex[:8]}"
    client = _s3_client(seaweedfs)
    client.put_object(
        Bucket="pulse-source",
        Key=f"{prefix}/astronaut-8.png",
        Body=(EXAMPLES / "astronaut-8.png").read_bytes(),
    )
    _credentials_from_env(monkeypatch, seaweedfs.env())
    urls = {
        "source": seaweedfs.url("pulse-source", prefix),
        "dest": seaweedfs.url("pulse-dest", prefix),
    }
    urls[missing] = f"s3://pulse-missing-{uuid.uuid4().hex[:8]}/{prefix}"

    with pytest.raises(StorageError, match="does not exist") as caught:
        run_restore(urls["source"], urls["dest"], **FAST)

    assert "create it or fix the URL" in str(caught.value)
    assert _s3_keys(client, "pulse-dest", f"{prefix}/") == set()


# --------------------------------------------------------------------------------------------
# `pulse run`


def _run_cli(source: Path, dest: Path, *extra: str) -> int:
    return main(
        [
            "run",
            str(source),
            str(dest),
            "--steps",
            "3",
            "--samples",
            "1",
            "--preset",
            "reference",
            *extra,
        ]
    )


def test_pulse_run_restores_a_folder_and_prints_the_manifest_path(
    prefect_harness, tmp_path, capsys
):
    dest = tmp_path / "dest"

    code = _run_cli(EXAMPLES, dest)

    out = capsys.readouterr().out
    assert code == 0
    assert "4 restored, 0 failed, 0 already done (of 4 found)" in out
    manifest = next(line for line in out.splitlines() if line.startswith("samples manifest:"))
    path = Path(manifest.split(":", 1)[1].strip())
    assert path.is_file() and path.name == "samples.parquet" and dest in path.parents
    assert pq.read_table(path).num_rows == 4


def test_pulse_run_json_output_parses(prefect_harness, tmp_path, capsys):
    dest = tmp_path / "dest"

    code = _run_cli(EXAMPLES, dest, "--limit", "1", "--json")

    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (summary["found"], summary["attempted"], summary["ok"]) == (4, 1, 1)
    assert Path(summary["samples_key"]).is_file()


def test_pulse_run_exits_1_and_names_the_inputs_when_too_many_fail(
    prefect_harness, tmp_path, capsys
):
    source = tmp_path / "source"
    source.mkdir()
    (source / "empty.png").write_bytes(b"")

    code = _run_cli(source, tmp_path / "dest")

    err = capsys.readouterr().err
    assert code == 1
    assert "1 input(s) failed (max_failures=0)" in err and "empty.png" in err


# --------------------------------------------------------------------------------------------
# Concurrency and one pipeline


def _twelve_inputs(folder: Path) -> Path:
    """12 LR faces of two sizes (the examples, mirrored and rotated): 3 batches of up to 5."""
    folder.mkdir()
    for name in EXAMPLE_KEYS:
        image = Image.open(EXAMPLES / name).convert("RGB")
        stem = name.rsplit(".", 1)[0]
        image.save(folder / f"{stem}.png")
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"{stem}-mirror.png")
        image.transpose(Image.Transpose.ROTATE_90).save(folder / f"{stem}-rot.png")
    return folder


def _pngs(dest: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dest).as_posix(): p.read_bytes()
        for p in dest.rglob("*.png")
        if not p.relative_to(dest).as_posix().startswith("_")
    }


def test_two_workers_write_byte_identical_pngs_to_one_worker(prefect_harness, tmp_path, capsys):
    """Threads share one cached generator: the default preset's per-call offsets must not leak.

    Before the reentrant search this failed 7 of 12 inputs with a tensor size mismatch, and
    with equal batch sizes wrote different PNGs. Default preset (intermediate layers, early
    stop, restarts), fewer steps; 12 inputs in tasks of 5, 5 and 2 inputs (different rows).
    """
    source = _twelve_inputs(tmp_path / "source")
    common = ["--steps", "12", "--samples", "2", "--inputs-per-task", "5"]
    one, two = tmp_path / "one-worker", tmp_path / "two-workers"

    assert main(["run", str(source), str(one), *common, "--max-workers", "1"]) == 0
    assert main(["run", str(source), str(two), *common, "--max-workers", "2"]) == 0

    capsys.readouterr()
    written_one, written_two = _pngs(one), _pngs(two)
    assert len(written_one) == 12 * (2 * 2 + 1)  # 2 samples + 2 LR checks + a sheet each
    assert written_one.keys() == written_two.keys()
    differing = [k for k in written_one if written_one[k] != written_two[k]]
    assert differing == []


def test_pulse_upsample_and_the_flow_write_the_same_outputs_and_manifests(
    prefect_harness, tmp_path, capsys
):
    """One pipeline: same names, PNG bytes, manifest columns and index for the same batches."""
    flow_dest, cli_dest = tmp_path / "flow", tmp_path / "cli"
    # search_batch 32 // 1 restart = 32 inputs per upsample batch: one batch, as the flow's task
    args = ["--steps", "3", "--samples", "1", "--preset", "reference"]
    assert main(["run", str(EXAMPLES), str(flow_dest), *args, "--inputs-per-task", "32"]) == 0
    assert main(["upsample", str(EXAMPLES), "--out", str(cli_dest), *args, "--quiet"]) == 0
    capsys.readouterr()

    assert _pngs(flow_dest) == _pngs(cli_dest)
    flow_rows = ds.dataset(flow_dest / "_manifest" / "samples", format="parquet").to_table()
    cli_rows = ds.dataset(cli_dest / "_manifest" / "samples", format="parquet").to_table()
    assert flow_rows.schema == cli_rows.schema
    same = ["input_key", "sample_index", "seed", "final_l2", "output_key", "conversions"]
    assert flow_rows.select(same).sort_by("input_key").to_pylist() == (
        cli_rows.select(same).sort_by("input_key").to_pylist()
    )
    (run_dir,) = (cli_dest / "_runs").iterdir()
    assert {p.name for p in run_dir.rglob("*") if p.is_file()} == {
        "samples.parquet",
        "losses.parquet",
        "lease.json",  # finished: "completed"
    }


def test_the_run_tally_keeps_exact_counts_and_bounded_detail():
    from pulse_core.pipeline import BatchOutcome, InputOutcome, RunTally

    def batch(n: int, failed: bool) -> BatchOutcome:
        status, error = ("failed", "bad") if failed else ("ok", None)
        item = InputOutcome(f"in-{n}.png", status, error, 1, 1, 0.0, ["k"] if not failed else [])
        return BatchOutcome(f"{n:05d}", [item], 0.1, "host:1", 1, "cpu", "demo", "sha")

    tally = RunTally(keep_inputs=10, keep_failures=3)
    for n in range(100):
        tally.add(batch(n, failed=n % 10 == 9))
    assert (tally.attempted, tally.ok, tally.failed, tally.samples_written) == (100, 90, 10, 90)
    assert len(tally.inputs) == 10 and len(tally.failures) == 3
    assert sum(i.status == "failed" for i in tally.inputs) == 10  # failures displace successes
