"""From the batches' rows to what a person reads: the table, the summary, plots, contact sheets.

`finish_evaluation` merges the Parquet parts of a run into `DEST/eval.parquet` (every row) and
`DEST/losses.parquet` (every step of every sample), aggregates them per (factor, degradation,
method) into `DEST/summary.json` and `DEST/report.md`, and draws `DEST/plots/*.png` and
`DEST/sheets/x<f>-<degradation>.png`. Charts are drawn with Pillow (already a core dependency):
matplotlib is not needed for a bar chart and a few curves, and the core of `pulse eval` must
work with the core dependencies only.

Aggregates, per (factor, degradation, method):
- `inputs_within_eps`: share of inputs with at least one sample whose DS(clamped output) is
  within eps of the LR input the search saw; `samples_within_eps` over samples;
  `inputs_converged`: the search's own verdict (`converged` in the manifest: the unclamped best
  iterate), PULSE only. Clamping to [0, 1] can push a borderline sample just past eps, so the
  first is the stricter of the two;
- `lr_psnr` / `lr_psnr_clean`: median PSNR of DS(output) against the seen and the clean LR;
- `niqe_set`: NIQE of the set (all its images' blocks in one Gaussian, see `niqe.py`);
  `niqe_mean`: mean per-image NIQE where images have >= 2 blocks (1024 px outputs);
- `brisque`, `psnr_gt`, `ssim_gt`, `diversity`, `identity` (and `same_person`: share < 0.6):
  means; `steps_per_input`: optimiser steps per input, every restart counted.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pulse_core.evaluation import niqe
from pulse_core.evaluation.identity import SAME_PERSON
from pulse_core.evaluation.run import (
    EVAL_PREFIX,
    GROUND_TRUTH,
    LOSS_SCHEMA,
    PULSE,
    ROW_SCHEMA,
    BatchEval,
    load_tools,
)
from pulse_core.evaluation.settings import EvalSettings
from pulse_core.manifest import write_parquet
from pulse_core.storage import Storage

ROWS_KEY = "eval.parquet"
LOSSES_KEY = "losses.parquet"
SUMMARY_KEY = "summary.json"
REPORT_KEY = "report.md"
PLOTS = "plots"
SHEETS = "sheets"

# (aggregate key, column title, format): the report's and the CLI's table
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("inputs_within_eps", "inputs within eps", "{:.0%}"),
    ("inputs_converged", "inputs conv. (search)", "{:.0%}"),
    ("samples_within_eps", "samples within eps", "{:.0%}"),
    ("lr_psnr", "LR PSNR (dB)", "{:.1f}"),
    ("lr_psnr_clean", "LR PSNR clean (dB)", "{:.1f}"),
    ("niqe_set", "NIQE (set)", "{:.2f}"),
    ("niqe_mean", "NIQE (mean)", "{:.2f}"),
    ("brisque", "BRISQUE", "{:.1f}"),
    ("psnr_gt", "PSNR vs GT (dB)", "{:.2f}"),
    ("ssim_gt", "SSIM vs GT", "{:.3f}"),
    ("diversity", "diversity (RMS)", "{:.3f}"),
    ("identity", "identity dist.", "{:.3f}"),
    ("same_person", "same person", "{:.0%}"),
    ("steps_per_input", "steps / input", "{:.0f}"),
)


@dataclass
class EvalSummary:
    """What an evaluation did: the flow's return value, printed by `pulse eval`."""

    run_id: str
    source: str
    dest: str
    ground_truths: int
    inputs: int  # restored LR inputs (ground truths x factors x degradations)
    table: list[dict[str, Any]]  # one aggregate per (factor, degradation, method)
    failures: list[tuple[str, str]] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # metric or baseline -> why absent
    files: dict[str, str] = field(default_factory=dict)  # what -> key in dest
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values: Iterable[Any]) -> float | None:
    v = _finite(values)
    return statistics.fmean(v) if v else None


def _median(values: Iterable[Any]) -> float | None:
    v = _finite(values)
    return statistics.median(v) if v else None


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summarise(
    rows: Sequence[dict[str, Any]], niqe_params: dict[str, np.ndarray] | None
) -> list[dict[str, Any]]:
    """One aggregate per (factor, degradation, method), in a stable order."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["factor"], r["degradation"], r["method"]), []).append(r)
    order = {GROUND_TRUTH: 0, PULSE: 2}
    out = []
    for (factor, deg, method), rs in sorted(
        groups.items(),
        key=lambda kv: (kv[0][0], kv[0][1] != "clean", kv[0][1], order.get(kv[0][2], 1), kv[0][2]),
    ):
        by_input: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            by_input.setdefault(r["input"], []).append(r)
        agg: dict[str, Any] = {
            "factor": factor,
            "degradation": deg,
            "method": method,
            "inputs": len(by_input),
            "samples": len(rs),
        }
        if method != GROUND_TRUTH:
            agg["inputs_within_eps"] = _share(
                [any(r["within_eps"] for r in g) for g in by_input.values()]
            )
            agg["samples_within_eps"] = _share([bool(r["within_eps"]) for r in rs])
            agg["lr_psnr"] = _median(r["lr_psnr"] for r in rs)
            agg["lr_psnr_clean"] = _median(r["lr_psnr_clean"] for r in rs)
            agg["psnr_gt"] = _mean(r["psnr_gt"] for r in rs)
            agg["ssim_gt"] = _mean(r["ssim_gt"] for r in rs)
        if method == PULSE:
            agg["inputs_converged"] = _share(
                [any(bool(r["converged"]) for r in g) for g in by_input.values()]
            )
            agg["diversity"] = _mean(g[0]["diversity"] for g in by_input.values())
            agg["steps_per_input"] = _mean(g[0]["input_steps"] for g in by_input.values())
        blocks = [np.asarray(r["niqe_blocks"]).reshape(-1, 36) for r in rs if r.get("niqe_blocks")]
        if blocks and niqe_params is not None:
            agg["niqe_set"] = niqe.score(np.concatenate(blocks), niqe_params)
            agg["niqe_mean"] = _mean(r.get("niqe") for r in rs)
        agg["brisque"] = _mean(r.get("brisque") for r in rs)
        ident = _finite(r.get("identity") for r in rs)
        if ident:
            agg["identity"] = statistics.fmean(ident)
            agg["same_person"] = sum(d < SAME_PERSON for d in ident) / len(ident)
        out.append(
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in agg.items()
            }
        )
    return out


def markdown_table(table: Sequence[dict[str, Any]]) -> str:
    """The aggregates as a markdown table (only the columns some row has)."""
    cols = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in table)]
    lines = [
        "| factor | degradation | method | inputs | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    for row in table:
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in cols]
        factor = "GT" if row["method"] == GROUND_TRUTH else f"x{row['factor']}"
        lines.append(
            f"| {factor} | {row['degradation']} | {row['method']} | {row['inputs']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def report_markdown(summary: EvalSummary, plots: Sequence[str], sheets: Sequence[str]) -> str:
    s = summary
    restore = s.settings.get("restore", {})
    search = restore.get("search", {}) or {}
    lines = [
        f"# Evaluation {s.run_id}",
        "",
        f"- ground truth: `{s.source}` ({s.ground_truths} images)",
        f"- results: `{s.dest}`",
        f"- model `{restore.get('model')}`, preset `{restore.get('preset')}`, "
        f"{restore.get('samples')} samples per input, {search.get('steps')} steps, "
        f"eps {search.get('eps')}",
        f"- factors {list(s.settings.get('factors', []))}, LR operator "
        f"`{s.settings.get('lr_operator') or search.get('operator')}`, degradations "
        f"{['clean', *s.settings.get('degrade', [])]}",
        "",
        markdown_table(s.table),
        "",
        "LR consistency is what PULSE promises (DS(output) within eps of the input); PSNR and "
        "SSIM against the ground truth are reported, never optimised for. NIQE (set) pools the "
        "blocks of all of a row's images (see docs/evaluation.md); lower NIQE and BRISQUE = "
        "more natural.",
        "",
    ]
    if s.missing:
        lines += ["## Not measured", ""]
        lines += [f"- **{name}**: {why}" for name, why in s.missing.items()]
        lines.append("")
    if s.failures:
        lines += ["## Failures", "", "| input | reason |", "|---|---|"]
        lines += [f"| `{k}` | {r.replace('|', '/')} |" for k, r in s.failures[:200]]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if sheets:
        lines += ["## Contact sheets (LR | bicubic | samples | ground truth)", ""]
        lines += [f"![{p}]({p})" for p in sheets] + [""]
    lines += [f"Files: `{ROWS_KEY}` (every row), `{LOSSES_KEY}` (every step), `{SUMMARY_KEY}`."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Charts (Pillow)

PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


def _canvas(
    title: str, width: int, height: int, left: int
) -> tuple[Image.Image, ImageDraw.ImageDraw, ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """A white chart with its title at the top left, and the pen and font to draw the rest."""
    font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    pen.text((left, 4), title, fill=(0, 0, 0), font=font)
    return img, pen, font


def bar_chart(
    title: str,
    groups: Sequence[str],
    series: Sequence[str],
    values: dict[tuple[str, str], float | None],
    *,
    width: int = 640,
    height: int = 320,
) -> Image.Image:
    """Grouped bars: one group per x label, one bar per series; a missing value draws nothing."""
    left, right, top, bottom = 50, 10, 24, 40
    img, pen, font = _canvas(title, width, height, left)
    finite = [v for v in values.values() if v is not None and math.isfinite(v)]
    hi = max([*finite, 0.0]) or 1.0
    lo = min([*finite, 0.0])
    span = hi - lo or 1.0

    def y_of(v: float) -> float:
        return top + (hi - v) / span * (height - top - bottom)

    pen.line((left, y_of(0), width - right, y_of(0)), fill=(0, 0, 0))
    for tick in (lo, (lo + hi) / 2, hi):
        pen.text((2, y_of(tick) - 5), f"{tick:.3g}", fill=(80, 80, 80), font=font)
    gw = (width - left - right) / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(series))
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + gw * 0.1
        for si, s in enumerate(series):
            v = values.get((g, s))
            if v is None or not math.isfinite(v):
                continue
            x = x0 + si * bw
            pen.rectangle(
                (x, min(y_of(v), y_of(0)), x + bw - 2, max(y_of(v), y_of(0))),
                fill=PALETTE[si % len(PALETTE)],
            )
        pen.text((x0, height - bottom + 4), g[: int(gw // 6)], fill=(0, 0, 0), font=font)
    for si, s in enumerate(series):  # legend
        x = left + si * 150
        pen.rectangle((x, height - 14, x + 8, height - 6), fill=PALETTE[si % len(PALETTE)])
        pen.text((x + 11, height - 16), s[:22], fill=(0, 0, 0), font=font)
    return img


def line_chart(
    title: str,
    curves: dict[str, Sequence[float]],
    *,
    log_y: bool = True,
    hline: float | None = None,
    width: int = 640,
    height: int = 320,
) -> Image.Image:
    """Curves over steps (log y by default); `hline`: a dashed reference (eps)."""
    left, right, top, bottom = 60, 10, 24, 30
    img, pen, font = _canvas(title, width, height, left)

    def t(v: float) -> float:
        return math.log10(max(v, 1e-12)) if log_y else v

    vals = [t(v) for c in curves.values() for v in c if v is not None and math.isfinite(v)]
    if hline is not None:
        vals.append(t(hline))
    if not vals:
        return img
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    n = max((len(c) for c in curves.values()), default=1)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + i / max(1, n - 1) * (width - left - right)
        return x, top + (hi - t(v)) / span * (height - top - bottom)

    for tick in (lo, hi):
        label = f"{10**tick:.2g}" if log_y else f"{tick:.3g}"
        pen.text(
            (2, top + (hi - tick) / span * (height - top - bottom) - 5),
            label,
            fill=(80, 80, 80),
            font=font,
        )
    if hline is not None:
        y = xy(0, hline)[1]
        for x in range(left, width - right, 8):
            pen.line((x, y, x + 4, y), fill=(120, 120, 120))
    for ci, (name, c) in enumerate(curves.items()):
        pts = [xy(i, v) for i, v in enumerate(c) if v is not None and math.isfinite(v)]
        colour = PALETTE[ci % len(PALETTE)]
        if len(pts) > 1:
            pen.line(pts, fill=colour, width=2)
        pen.text((left + ci * 110, height - 16), name[:16], fill=colour, font=font)
    pen.text((width - right - 60, height - bottom + 2), f"{n} steps", fill=(0, 0, 0), font=font)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


PLOTTED = (
    ("inputs_within_eps", "inputs within eps (share)"),
    ("niqe_set", "NIQE of the set (lower = more natural)"),
    ("brisque", "BRISQUE (lower = more natural)"),
    ("psnr_gt", "PSNR vs ground truth (dB)"),
    ("ssim_gt", "SSIM vs ground truth"),
)


def draw_plots(table: Sequence[dict[str, Any]], losses: pa.Table, eps: float) -> dict[str, bytes]:
    """name -> PNG: one bar chart per metric (method per factor/degradation) and loss curves."""
    rows = [r for r in table if r["method"] != GROUND_TRUTH]
    groups = list(dict.fromkeys(f"x{r['factor']} {r['degradation']}" for r in rows))
    series = list(dict.fromkeys(r["method"] for r in rows))
    out: dict[str, bytes] = {}
    for key, title in PLOTTED:
        values = {(f"x{r['factor']} {r['degradation']}", r["method"]): r.get(key) for r in rows}
        if any(v is not None for v in values.values()):
            out[f"{key}.png"] = _png(bar_chart(title, groups, series, values))
    if losses.num_rows:
        d = losses.select(["factor", "degradation", "step", "mse"]).to_pydict()
        per: dict[str, dict[int, list[float]]] = {}
        for f, g, s, m in zip(d["factor"], d["degradation"], d["step"], d["mse"], strict=True):
            per.setdefault(f"x{f} {g}", {}).setdefault(s, []).append(m)
        curves = {
            name: [statistics.median(steps[i]) for i in sorted(steps)]
            for name, steps in per.items()
        }
        title = "PULSE: median LR MSE per step (dashed: eps)"
        out["loss-curves.png"] = _png(line_chart(title, curves, hline=eps))
    return out


def stack_sheets(dest: Storage, labels: Sequence[str], limit: int) -> dict[str, bytes]:
    """`x<f>-<deg>.png`: the first `limit` input strips of each (factor, degradation), stacked."""
    by_group: dict[str, list[str]] = {}
    for label in labels:
        factor, deg, _ = label.split("/", 2)
        by_group.setdefault(f"{factor}-{deg}", []).append(label)
    out = {}
    for group, members in by_group.items():
        strips = []
        for label in sorted(members)[:limit]:
            key = f"{SHEETS}/{label.rsplit('.', 1)[0]}.png"
            if dest.exists(key):
                strips.append(Image.open(io.BytesIO(dest.read_bytes(key))).convert("RGB"))
        if strips:
            sheet = Image.new(
                "RGB",
                (max(s.width for s in strips), sum(s.height for s in strips)),
                (255, 255, 255),
            )
            y = 0
            for s in strips:
                sheet.paste(s, (0, y))
                y += s.height
            out[f"{group}.png"] = _png(sheet)
    return out


def _read(dest: Storage, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(dest.read_bytes(key)))


def finish_evaluation(
    dest: Storage,
    run_id: str,
    source_url: str,
    settings: EvalSettings,
    batches: Sequence[BatchEval],
    seconds: float = 0.0,
) -> EvalSummary:
    """Merge the parts, aggregate, write table, summary, report, plots and sheets; clean up."""
    parts = [_read(dest, b.part_key) for b in batches]
    loss_parts = [_read(dest, b.losses_key) for b in batches]
    rows = pa.concat_tables(parts) if parts else ROW_SCHEMA.empty_table()
    losses = pa.concat_tables(loss_parts) if loss_parts else LOSS_SCHEMA.empty_table()
    write_parquet(dest, ROWS_KEY, rows)
    write_parquet(dest, LOSSES_KEY, losses)
    tools = load_tools(tuple(settings.metrics))
    table = summarise(rows.to_pylist(), tools.niqe_params)
    restore = settings.restore.resolved()
    plots = draw_plots(table, losses, restore.config.eps)
    for name, data in plots.items():
        dest.write_bytes(f"{PLOTS}/{name}", data, "image/png")
    labels = [
        lab
        for lab, m in zip(
            rows.column("label").to_pylist(), rows.column("method").to_pylist(), strict=True
        )
        if m == PULSE
    ]
    sheets = stack_sheets(dest, list(dict.fromkeys(labels)), settings.sheets)
    for name, data in sheets.items():
        dest.write_bytes(f"{SHEETS}/{name}", data, "image/png")
    missing: dict[str, str] = {}
    failures: list[tuple[str, str]] = []
    for b in batches:
        missing |= b.missing
        failures += b.failures
    summary = EvalSummary(
        run_id=run_id,
        source=source_url,
        dest=dest.url,
        ground_truths=sum(b.ground_truths for b in batches),
        inputs=sum(b.inputs for b in batches),
        table=table,
        failures=failures,
        missing=missing,
        files={
            "rows": ROWS_KEY,
            "losses": LOSSES_KEY,
            "summary": SUMMARY_KEY,
            "report": REPORT_KEY,
            "plots": ", ".join(f"{PLOTS}/{n}" for n in plots),
            "sheets": ", ".join(f"{SHEETS}/{n}" for n in sheets),
        },
        settings=asdict(settings.resolved()),
        seconds=seconds,
    )
    text = report_markdown(
        summary, [f"{PLOTS}/{n}" for n in plots], [f"{SHEETS}/{n}" for n in sheets]
    )
    dest.write_bytes(REPORT_KEY, text.encode(), "text/markdown")
    dest.write_bytes(
        SUMMARY_KEY,
        json.dumps(summary.to_dict(), indent=2, default=str).encode(),
        "application/json",
    )
    for b in batches:
        dest.delete(b.part_key)
        dest.delete(b.losses_key)
    _ = EVAL_PREFIX  # parts live under it; the prefix itself holds nothing else
    return summary


__all__ = [
    "COLUMNS",
    "EvalSummary",
    "bar_chart",
    "draw_plots",
    "finish_evaluation",
    "line_chart",
    "markdown_table",
    "report_markdown",
    "summarise",
]
