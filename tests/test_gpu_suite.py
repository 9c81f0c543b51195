"""bench/gpu_suite.py in its CPU quick mode: the one-command GPU suite must never rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.gpu_suite import main


@pytest.mark.slow
def test_the_quick_cpu_suite_writes_json_and_a_markdown_table(tmp_path: Path):
    assert main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert set(payload) >= {"machine", "command", "grid", "results", "pipeline"}
    cells = {(r["family"], r["batch"], r["precision"]) for r in payload["results"]}
    families = ("stylegan1", "stylegan2", "stylegan3")
    assert cells == {(f, b, p) for f in families for b in (1, 2) for p in ("fp32", "bf16")}
    for row in payload["results"]:
        assert row["status"] == "ok", row
        assert row["step_ms_median"] > 0 and row["samples_per_s"] > 0 and row["peak_gb"] > 0
        assert row["estimate_gb"] is not None
    [pipeline] = payload["pipeline"]
    assert (pipeline["workers"], pipeline["devices"], pipeline["inputs"]) == (1, ["cpu"], 2)
    table = (tmp_path / "gpu_suite.md").read_text().splitlines()
    assert table[0].startswith("| generator | batch | precision | compile |")
    assert sum(line.startswith("| random-stylegan") for line in table) == len(cells)
    assert any(line.startswith("| pipeline generator") for line in table)
