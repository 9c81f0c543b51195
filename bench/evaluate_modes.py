"""Search modes on real faces: `pulse_core.evaluation` run once per mode, tables side by side.

A thin caller of the one evaluation code path (`pulse eval` runs the same): the faces come from
registry packages (`pulse_core.evaluation.faces`: split by index into `dev` and `held`, or the
`independent` set, which chose nothing), each mode is an `EvalSettings` whose restore carries
the mode's `SearchConfig`, and every number (LR consistency, NIQE, BRISQUE, PSNR/SSIM,
diversity, steps) is the evaluation's own.

    python bench/evaluate_modes.py --quick                    # smoke run (a minute)
    python bench/evaluate_modes.py --split held --factors 4,8 --modes preset-robust,plain-100
    python bench/evaluate_modes.py --table --out DIR          # markdown tables from results.json

Each mode's full output (eval.parquet, report.md, plots, sheets) is in OUT/<mode>/; OUT/results.json
holds every mode's aggregate rows. BRISQUE needs OpenCV contrib (`pip install -r
bench/requirements-eval.txt` or the `eval` extra) and `pulse models pull brisque`; NIQE needs
`pulse models pull niqe`; a missing one is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python bench/evaluate_modes.py` from a checkout

from pulse_core.evaluation import EvalSettings, evaluate  # noqa: E402
from pulse_core.evaluation.faces import SPLIT_NAMES, write_face_set  # noqa: E402
from pulse_core.evaluation.report import COLUMNS  # noqa: E402
from pulse_core.search import DEFAULT_PRESET, SearchConfig, preset  # noqa: E402
from pulse_core.settings import RestoreSettings  # noqa: E402

SAMPLES = 2  # samples per input
SEED = 0
SHEETS = 200  # a strip per input (small PNGs): colour-only sheets can be cut from them


@dataclass(frozen=True)
class Mode:
    name: str
    config: SearchConfig
    budget_rounds: int | None = None  # restart budget in rounds; None = the config's own

    def search_config(self) -> SearchConfig:
        if self.budget_rounds is None:
            return self.config
        return self.config.with_(restart_budget=float(self.budget_rounds))


def modes(step_scale: float = 1.0) -> list[Mode]:
    """The modes of docs/evaluation.md (plain PULSE, intermediate layers, the shipped preset)."""

    def steps(n: int) -> int:
        return max(3, round(n * step_scale))

    ref = SearchConfig.reference()

    def inter(layers: tuple[str, ...], radius: float) -> SearchConfig:
        return ref.with_(
            steps=steps(150),
            early_stop=True,
            intermediate_layers=layers,
            intermediate_radius=radius,
        )

    out = [
        Mode("plain-100", ref.with_(steps=steps(100))),
        Mode("plain-300", ref.with_(steps=steps(300))),
        Mode("plain-es-restarts", ref.with_(steps=steps(100), early_stop=True), 3),
    ]
    out += [Mode(f"inter-16x16-r{r:g}", inter(("16x16",), r)) for r in (0.02, 0.05, 0.1, 0.2)]
    out.append(Mode("inter-16x16-r0.05-restarts", inter(("16x16",), 0.05), 3))
    shipped = preset(DEFAULT_PRESET)
    out.append(Mode(f"preset-{DEFAULT_PRESET}", shipped.with_(steps=steps(shipped.steps))))
    # The default without the factor-2 rule (the same ball in the restart round): the comparison
    # that chose `restart_radius_growth` (docs/evaluation.md, "Factor 2").
    out.append(
        Mode(
            f"preset-{DEFAULT_PRESET}-no-widening",
            shipped.with_(steps=steps(shipped.steps), restart_radius_growth=1.0),
        )
    )
    return out


def mode_settings(mode: Mode, factors: tuple[int, ...], degrade: tuple[str, ...]) -> EvalSettings:
    restore = RestoreSettings(samples=SAMPLES, seed=SEED, search=mode.search_config())
    return EvalSettings(
        restore=restore, factors=factors, degrade=degrade, write_samples=False, sheets=SHEETS
    )


def combined_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One markdown table: baselines and ground truth once, then each mode's PULSE rows."""
    rows: list[tuple[str, dict[str, Any]]] = []
    first = next(iter(results.values()), [])
    rows += [(r["method"], r) for r in first if r["method"] != "pulse"]
    for name, table in results.items():
        rows += [(name, r) for r in table if r["method"] == "pulse"]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for _, r in rows)]
    lines = [
        "| factor | degradation | mode | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for name, r in sorted(rows, key=lambda nr: (nr[1]["factor"], nr[1]["degradation"])):
        cells = ["-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols]
        factor = "GT" if r["method"] == "ground-truth" else f"x{r['factor']}"
        lines.append(f"| {factor} | {r['degradation']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--split", default="all", choices=SPLIT_NAMES, help="face set (default all)")
    p.add_argument("--factors", default="4,8", help="scale factors (default 4,8: 16x16, 8x8)")
    p.add_argument("--degrade", default="", help="degradations, comma-separated")
    p.add_argument("--modes", default="", help="mode names, comma-separated (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a temp dir)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--offline", action="store_true", help="never fetch the faces")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 faces, 2 modes, 1/10 of the steps"
    )
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = p.parse_args(argv)

    out = args.out or Path(tempfile.mkdtemp(prefix="pulse-eval-modes-"))
    if args.table:
        print(combined_table(json.loads((out / "results.json").read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    mode_list = modes(0.1 if args.quick else 1.0)
    if args.modes:
        wanted = args.modes.split(",")
        unknown = set(wanted) - {m.name for m in mode_list}
        if unknown:
            raise SystemExit(
                f"unknown modes {sorted(unknown)}; known: {[m.name for m in mode_list]}"
            )
        mode_list = [m for m in mode_list if m.name in wanted]
    faces = out / "ground-truth"
    paths = write_face_set(faces, "colour" if args.quick else args.split, offline=args.offline)
    if args.quick:
        for path in paths[2:]:
            path.unlink()
        mode_list = [m for m in mode_list if m.name in ("plain-100", f"preset-{DEFAULT_PRESET}")]
    factors = tuple(int(f) for f in args.factors.split(",") if f)
    degrade = tuple(d for d in args.degrade.split(",") if d)
    results: dict[str, list[dict[str, Any]]] = {}
    for mode in mode_list:
        summary = evaluate(str(faces), str(out / mode.name), mode_settings(mode, factors, degrade))
        results[mode.name] = summary.table
        for name, why in summary.missing.items():
            print(f"  {mode.name}: not measured: {name} ({why})", flush=True)
        print(f"{mode.name}: {summary.inputs} LR inputs in {summary.seconds:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(combined_table(results))
    print(f"\nresults: {out}/results.json; per mode: {out}/<mode>/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
