"""bench/evaluate_modes.py is a thin caller of pulse_core.evaluation: its modes, settings and table.

The metrics themselves are tested in tests/test_eval_metrics.py, the evaluation end to end in
tests/test_eval_flow.py; here only what the script adds (no search, no network).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pulse_core.evaluation.faces import SPLITS, eye_crop_box
from pulse_core.search import SearchConfig, preset

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "evaluate_modes.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate_modes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_modes"] = module
    spec.loader.exec_module(module)
    return module


ev = _load_script()


def test_modes_have_unique_names_and_quick_scaling_shortens_them() -> None:
    full, quick = ev.modes(), ev.modes(0.1)
    names = [m.name for m in full]
    assert len(names) == len(set(names))
    assert {"plain-100", "plain-300", "plain-es-restarts", "preset-robust"} <= set(names)
    by_name = {m.name: m for m in quick}
    assert by_name["plain-100"].config.steps == 10
    assert by_name["plain-es-restarts"].search_config().restart_budget == 3
    assert full[0].config == SearchConfig.reference()
    assert {m.name: m for m in full}["preset-robust"].search_config() == preset("robust")


def test_a_mode_becomes_eval_settings_with_its_search_and_two_samples() -> None:
    mode = ev.modes()[0]
    settings = ev.mode_settings(mode, (4, 8), ("noise25",))
    assert settings.restore.config == mode.config
    assert settings.restore.samples == ev.SAMPLES == 2
    assert settings.factors == (4, 8) and settings.degradations == ("clean", "noise25")


def test_combined_table_shows_baselines_once_and_a_row_per_mode() -> None:
    def row(method: str, within: float) -> dict:
        return {"factor": 8, "degradation": "clean", "method": method, "inputs_within_eps": within}

    results = {
        "m1": [row("bicubic", 1.0), row("pulse", 0.5)],
        "m2": [row("bicubic", 1.0), row("pulse", 1.0)],
    }
    lines = ev.combined_table(results).splitlines()
    assert sum("| bicubic |" in line for line in lines) == 1
    assert "| x8 | clean | m1 | 50% |" in lines and "| x8 | clean | m2 | 100% |" in lines


def test_face_splits_do_not_overlap() -> None:
    dev, held = SPLITS["dev"], SPLITS["held"]
    assert not dev[0] & held[0] and not set(dev[1]) & set(held[1])
    assert len(dev[0]) + len(dev[1]) == len(held[0]) + len(held[1]) == 53


def test_eye_crop_box_is_square_with_the_eyes_at_the_set_height() -> None:
    from pulse_core.evaluation import faces

    left, top, right, bottom = eye_crop_box((100, 200), (200, 200))
    assert right - left == bottom - top == 320
    assert (200 - top) / (bottom - top) == pytest.approx(faces.EYE_HEIGHT, abs=0.01)
    assert (left + right) / 2 == 150
