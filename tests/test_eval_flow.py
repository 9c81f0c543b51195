"""`pulse eval` end to end on a handful of faces: without Prefect, as the flow (folder and S3), and
the command with --json. Few search steps (the numbers are not the point; the plumbing is)."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pulse_core.evaluation import EvalSettings, evaluate
from pulse_core.settings import build_settings
from pulse_core.storage import S3Storage, StorageConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
FACES = sorted((REPO_ROOT / "examples" / "hr").glob("*.png"))  # 2 public-domain 64x64 faces


def _settings(**changes: object) -> EvalSettings:
    restore = build_settings("robust", {"steps": 4}, samples=2)
    fields: dict[str, object] = {
        "restore": restore,
        "factors": (8,),
        "metrics": ("niqe",),
        "baselines": ("nearest", "bicubic"),
    }
    return EvalSettings(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.fixture
def ground_truth(tmp_path: Path) -> Path:
    folder = tmp_path / "gt"
    folder.mkdir()
    for f in FACES:
        shutil.copy(f, folder / f.name)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.mark.slow
def test_local_evaluation_writes_table_report_plots_and_sheets(
    demo_generator, ground_truth: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = evaluate(
        str(ground_truth),
        str(out),
        _settings(degrade=("noise25",), inputs_per_task=2),
        generator=demo_generator,
    )
    assert summary.ground_truths == 2 and summary.inputs == 4  # 2 faces x (clean, noise25)
    assert [k for k, _ in summary.failures] == ["broken.png"]
    rows = pq.read_table(out / "eval.parquet").to_pylist()
    # per face: 1 ground-truth row; per (face, degradation): 2 samples + nearest + bicubic
    assert len(rows) == 2 + 4 * 4
    pulse = [r for r in rows if r["method"] == "pulse"]
    assert {r["degradation"] for r in pulse} == {"clean", "noise25"}
    assert all(r["seed"] is not None and r["steps_run"] >= 1 for r in pulse)
    assert all(r["diversity"] is not None and r["diversity"] > 0 for r in pulse)
    bicubic = [r for r in rows if r["method"] == "bicubic" and r["degradation"] == "clean"]
    assert all(r["within_eps"] and r["ssim_gt"] > 0 for r in bicubic)
    noisy = [r for r in rows if r["method"] == "bicubic" and r["degradation"] == "noise25"]
    assert all(r["lr_psnr_clean"] < r["lr_psnr"] for r in noisy)  # it follows the noise
    methods = {(r["factor"], r["degradation"], r["method"]) for r in summary.table}
    assert (8, "noise25", "pulse") in methods and (1, "clean", "ground-truth") in methods
    assert pq.read_table(out / "losses.parquet").num_rows >= 4 * 2
    report = (out / "report.md").read_text()
    assert "| x8 | clean | pulse |" in report and "broken.png" in report
    assert (out / "plots" / "inputs_within_eps.png").is_file()
    assert (out / "plots" / "loss-curves.png").is_file()
    assert (out / "sheets" / "x8-clean.png").is_file()
    assert (out / "samples" / "x8" / "clean" / "astronaut-64" / "sample-1.png").is_file()
    assert json.loads((out / "summary.json").read_text())["inputs"] == 4
    assert not list((out / "_eval").rglob("*.parquet"))  # parts merged and removed


@pytest.mark.slow
def test_the_flow_evaluates_a_folder_and_publishes_artifacts(
    prefect_harness, ground_truth: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    from flows.evaluate import evaluate as evaluate_flow

    out = tmp_path / "flow-out"
    summary = evaluate_flow(str(ground_truth), str(out), settings=_settings())
    assert summary.inputs == 2 and (out / "report.md").is_file()
    rows = pq.read_table(out / "eval.parquet")
    assert set(rows.column("method").to_pylist()) == {
        "ground-truth",
        "pulse",
        "nearest",
        "bicubic",
    }

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    import asyncio

    found = asyncio.run(keys())
    assert any(k.startswith("eval-") and k.endswith("-table") for k in found)
    assert any(k.endswith("-report") for k in found)


@pytest.mark.slow
def test_the_flow_reads_and_writes_s3(
    prefect_harness, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.evaluate import evaluate as evaluate_flow

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    config = StorageConfig(endpoint_url=moto_endpoint, region="us-east-1", max_attempts=1)
    bucket = f"eval-{uuid.uuid4().hex[:12]}"
    store = S3Storage(bucket, "", config)
    store.client.create_bucket(Bucket=bucket)
    for f in FACES[:1]:
        store.write_bytes(f"gt/{f.name}", f.read_bytes())
    summary = evaluate_flow(
        f"s3://{bucket}/gt",
        f"s3://{bucket}/eval",
        settings=_settings(storage_endpoint=moto_endpoint, write_samples=False),
    )
    assert summary.ground_truths == 1 and summary.inputs == 1
    keys = {o.key for o in store.list(prefix="eval/")}
    assert {"eval/eval.parquet", "eval/report.md", "eval/summary.json"} <= keys
    assert "eval/sheets/x8-clean.png" in keys
    table = pq.read_table(io.BytesIO(store.read_bytes("eval/eval.parquet")))
    assert table.num_rows == 1 + 2 + 2


@pytest.mark.slow
def test_pulse_eval_json_prints_the_summary(
    demo_generator, ground_truth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pulse_cli.main import main

    out = tmp_path / "cli-out"
    code = main(
        [
            "eval",
            str(ground_truth),
            "--out",
            str(out),
            "--no-prefect",
            "--json",
            "--factors",
            "8",
            "--steps",
            "3",
            "--metrics",
            "none",
            "--no-write-samples",
            "--baselines",
            "nearest,bicubic",
        ]
    )
    assert code == 1  # broken.png failed: named in the summary, the rest evaluated
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"] == 2 and data["failures"][0][0] == "broken.png"
    assert data["settings"]["restore"]["samples"] == 2  # eval's own default
    assert data["settings"]["restore"]["search"]["steps"] == 3
    assert any(r["method"] == "pulse" for r in data["table"])
    assert (out / "eval.parquet").is_file()


def test_pulse_eval_refuses_bad_options_before_running(tmp_path: Path) -> None:
    from pulse_cli.main import main

    code = main(["eval", str(tmp_path), "--out", str(tmp_path / "o"), "--degrade", "sharpen"])
    assert code == 2


def test_an_evaluation_inside_its_source_never_takes_its_outputs_for_ground_truth(
    tmp_path: Path,
) -> None:
    from pulse_core.evaluation import list_ground_truths
    from pulse_core.storage import LocalStorage

    for key in ("a.png", "sub/b.jpg", "eval/sheets/x8-clean.png", "eval/samples/x8/c.png"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    source = LocalStorage(tmp_path)
    assert list_ground_truths(source, dest=LocalStorage(tmp_path / "eval")) == [
        "a.png",
        "sub/b.jpg",
    ]
    assert list_ground_truths(source, limit=1, dest=LocalStorage(tmp_path / "eval")) == ["a.png"]
