"""The run report's content: effective settings, batches, per-input effort, loss summary, previews.

The browser test (tests/test_ui_browser.py) shows it rendered by the UI; these check what it says
and that its previews are images a browser can load: presigned URLs on a real S3 server
(SeaweedFS checks signatures), small inline JPEGs for local folders.
"""

from __future__ import annotations

import base64
import io
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from flows.report import Links, report_markdown, results_table
from flows.restore import run_tags
from pulse_core.manifest import RunFiles
from pulse_core.pipeline import (
    BatchOutcome,
    InputOutcome,
    RunTally,
    SampleOutcome,
    summarise,
)
from pulse_core.render import sheet_key
from pulse_core.search import SearchConfig, preset
from pulse_core.settings import RestoreSettings
from pulse_core.storage import LocalStorage, StorageError, open_storage
from tasks.publish import LINK_EXPIRY_S, make_links, make_previews


def _ok(key: str, mse: float, converged: int, steps: int = 100, attempts: int = 2) -> InputOutcome:
    samples = [
        SampleOutcome(k, k, "restart", k < converged, mse + k, f"{key}/sample-{k}.png")
        for k in range(2)
    ]
    return InputOutcome(
        key,
        "ok",
        None,
        2,
        converged,
        mse,
        [s.output_key for s in samples],
        samples=samples,
        steps=steps,
        best_step=steps - 7,
        attempts=attempts,
    )


def _failed(key: str) -> InputOutcome:
    return InputOutcome(key, "failed", "the file is empty (0 bytes)", 0, 0, None, [])


def _batch(n: str, inputs: list[InputOutcome], worker: str = "box:11") -> BatchOutcome:
    return BatchOutcome(n, inputs, 2.5, worker, 1, "cpu", "demo", "abc")


@pytest.fixture
def summary():
    tally = RunTally.of(
        [
            _batch("00000", [_ok("a.png", 0.001, 2), _failed("b.png")]),
            _batch(
                "00001",
                [_ok("c.png", 0.004, 0, steps=300, attempts=4), _ok("d.png", 0.002, 1)],
                "box:12",
            ),
        ]
    )
    settings = RestoreSettings(preset="robust").resolved()
    files = RunFiles("_runs/r1/samples.parquet", "_runs/r1/losses.parquet", 8, 100)
    return summarise("r1", "/in", "/out", settings, 4, 0, tally, 10.0, files)


def test_the_loss_summary_counts_inputs_samples_and_the_median_best_error(summary):
    loss = summary.loss
    assert (loss.inputs, loss.converged_inputs) == (3, 2)
    assert (loss.samples, loss.converged_samples) == (6, 3)
    assert (loss.min_error, loss.median_error, loss.max_error) == (0.001, 0.002, 0.004)
    assert (loss.steps, loss.attempts) == (500, 8)
    report = report_markdown(summary)  # robust's eps, 2e-3
    assert "inputs with a sample within eps (0.002): **2 of 3 (67%)**" in report
    assert "samples within eps: 3 of 6 (50%)" in report
    assert "min 0.001, median 0.002, max 0.004" in report


def test_the_report_lists_every_setting_as_used_and_the_device_that_ran(summary):
    report = report_markdown(summary)
    settings = report.split("## Settings as used", 1)[1]
    used = preset("robust")
    for f in fields(SearchConfig):  # each with the preset's value, not None for "the preset's"
        assert f"| {f.name} | `{getattr(used, f.name)!r}` |" in settings, f.name
    for f in fields(RestoreSettings):
        assert f"| {f.name} | " in settings or f.name == "search", f.name
    assert "| steps | `150` |" in settings  # robust's own value
    assert "auto (ran on cpu)" in settings


def test_each_batch_is_listed_with_its_inputs_device_and_worker(summary):
    batches = report_markdown(summary).split("## Batches", 1)[1]
    assert "| 00000 | `a.png` .. `b.png` | 2 | 1 | 1 | cpu | box:11 | 2.5 |" in batches
    assert "| 00001 | `c.png` .. `d.png` | 2 | 2 | 0 | cpu | box:12 | 2.5 |" in batches


def test_per_input_steps_best_step_and_attempts_in_the_report_and_table(summary):
    report = report_markdown(summary)
    assert "| `c.png` | ok | 0/2 | 0.004 | 300 | 293 | 4 |" in report
    table = results_table(summary.inputs, 0.002, "s3://bucket/out")
    assert table[0]["input"] == "b.png"  # failures first
    row = next(r for r in table if r["input"] == "c.png")
    assert (row["steps"], row["best step"], row["attempts"], row["eps"]) == (300, 293, 4, 0.002)
    assert row["outputs"].startswith("s3://bucket/out/c.png/sample-0.png")


def test_a_settings_dict_from_json_renders_too(summary):
    """The flow's summary crosses process boundaries as JSON: nested settings stay readable."""
    summary.settings = asdict(RestoreSettings().resolved())
    assert "| intermediate_radius | `0.05` |" in report_markdown(summary)


def test_run_tags_name_the_product_model_and_preset():
    assert run_tags(RestoreSettings(preset="fast")) == ["pulse", "model:demo", "preset:fast"]
    weights = RestoreSettings(model="/models/ffhq/stylegan2-ffhq-1024.pkl", preset="reference")
    assert run_tags(weights)[1] == "model:stylegan2-ffhq-1024.pkl"


def _sheet(dest, key: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (640, 200), (10, 200, 30)).save(buf, format="PNG")
    dest.write_bytes(sheet_key(key), buf.getvalue())


def test_local_previews_are_small_inline_jpegs_with_file_links(tmp_path: Path):
    dest = LocalStorage(tmp_path)
    inputs = [_failed("x.png")] + [_ok(f"in-{i}.png", 0.001, 1) for i in range(10)]
    for item in inputs[1:]:
        _sheet(dest, item.input_key)
    previews = make_previews.fn(dest, inputs)
    assert [p.input_key for p in previews] == [f"in-{i}.png" for i in range(8)]  # 8, no failures
    head, data = previews[0].src.split(",", 1)
    assert head == "data:image/jpeg;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "JPEG" and image.size == (480, 150)
    assert previews[0].link == (tmp_path / "in-0" / "sheet.png").as_uri()


def test_a_missing_sheet_leaves_its_preview_out_not_the_report(tmp_path: Path):
    dest = LocalStorage(tmp_path)
    inputs = [_ok("gone.png", 0.001, 1), _ok("here.png", 0.001, 1)]
    _sheet(dest, "here.png")
    previews = make_previews.fn(dest, inputs)
    assert [p.input_key for p in previews] == ["here.png"]


@pytest.mark.integration
def test_s3_previews_and_manifest_links_are_presigned_urls_a_browser_can_load(seaweedfs):
    dest = open_storage(
        seaweedfs.url(prefix=f"report-{uuid.uuid4().hex[:8]}"), seaweedfs.storage_config()
    )
    _sheet(dest, "face.png")
    dest.write_bytes("_runs/r1/samples.parquet", b"PAR1...")
    dest.write_bytes("_runs/r1/losses.parquet", b"PAR1...")
    previews = make_previews.fn(dest, [_ok("face.png", 0.001, 1)])
    assert previews[0].src == previews[0].link and previews[0].src.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(previews[0].src, timeout=30) as response:  # no credentials here
        assert Image.open(io.BytesIO(response.read())).size == (640, 200)
    tampered = previews[0].src.replace("face/sheet.png", "face/other.png")
    with pytest.raises(urllib.error.HTTPError):  # the signature covers the key
        urllib.request.urlopen(tampered, timeout=30)

    links = make_links(dest, RunFiles("_runs/r1/samples.parquet", "_runs/r1/losses.parquet", 1, 1))
    assert links.samples == f"{dest.url}/_runs/r1/samples.parquet"
    with urllib.request.urlopen(links.samples_url, timeout=30) as response:
        assert response.read() == b"PAR1..."
    remaining = (links.expires - datetime.now(UTC)).total_seconds()
    assert LINK_EXPIRY_S - 60 < remaining <= LINK_EXPIRY_S
    report = report_markdown(_summary_for(dest.url), previews, links)
    assert f"valid until {links.expires:%Y-%m-%d %H:%M} UTC" in report
    assert f"![face.png]({previews[0].src})" in report


def _summary_for(dest: str):
    tally = RunTally.of([_batch("00000", [_ok("face.png", 0.001, 1)])])
    return summarise("r1", "/in", dest, RestoreSettings().resolved(), 1, 0, tally, 1.0, None)


def test_presigned_urls_last_at_most_a_week(moto_endpoint):
    from pulse_core.storage import StorageConfig

    dest = open_storage("s3://any-bucket/p", StorageConfig(endpoint_url=moto_endpoint))
    with pytest.raises(StorageError, match="7 days"):
        dest.share_url("x.png", 8 * 24 * 3600)
    assert LocalStorage("/").share_url("x.png", 60) is None


def test_local_links_are_full_paths(tmp_path: Path):
    dest = LocalStorage(tmp_path)
    links = make_links(dest, RunFiles("_runs/r1/samples.parquet", "_runs/r1/losses.parquet", 1, 1))
    assert links == Links(
        dest=tmp_path.as_posix(),
        samples=f"{tmp_path.as_posix()}/_runs/r1/samples.parquet",
        losses=f"{tmp_path.as_posix()}/_runs/r1/losses.parquet",
        index=f"{tmp_path.as_posix()}/_manifest/samples/",
    )
