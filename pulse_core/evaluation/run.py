"""The evaluation of one batch of ground truths: GT -> LR -> degrade -> restore -> metric rows.

The restore is the one pipeline's (`pulse_core.pipeline.restore_decoded` on `DecodedInput`s,
each LR input encoded as the 8-bit PNG a user would hand in and decoded by `load_image` and
`prepare_input`), so the numbers are those of `pulse upsample` and `pulse run` with the same
settings: there is no second search path to drift from the product.

Per (ground truth, factor, degradation) the batch records one row per PULSE sample and one per
baseline, plus one `ground-truth` row per image (its own realism), and writes them as a Parquet
part under `DEST/_eval/<run id>/parts/`; `finish_evaluation` (report.py) merges the parts.
Nothing here imports Prefect: the flow and `pulse eval --no-prefect` call the same functions.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw, ImageFont

from pulse_core.devices import pick_device
from pulse_core.downscale import downscale
from pulse_core.errors import PulseError
from pulse_core.evaluation import metrics, niqe
from pulse_core.evaluation.assets import niqe_params_path
from pulse_core.evaluation.baselines import upscalers
from pulse_core.evaluation.brisque import Brisque, load_brisque
from pulse_core.evaluation.degrade import degradation_seed, degrade
from pulse_core.evaluation.identity import Embedder, identity_distance, load_embedder
from pulse_core.evaluation.settings import EvalSettings
from pulse_core.generators.base import Generator
from pulse_core.generators.loading import load_generator
from pulse_core.imaging import encode_png, load_image, prepare_input, to_pil
from pulse_core.manifest import write_parquet
from pulse_core.pipeline import IMAGE_SUFFIXES, DecodedInput, restore_decoded
from pulse_core.render import output_base, write_outputs
from pulse_core.storage import Storage, is_transient

PULSE = "pulse"
GROUND_TRUTH = "ground-truth"
EVAL_PREFIX = "_eval"  # run parts; final files sit at dest's root (eval.parquet, report.md...)
StepCallback = Callable[[int, int, torch.Tensor], None]

ROW_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("input", pa.string()),  # the ground truth's key in source
        ("label", pa.string()),  # x<factor>/<degradation>/<input>: the search's input name
        ("factor", pa.int32()),  # 1 for ground-truth rows
        ("degradation", pa.string()),  # clean, noise25, ...
        ("method", pa.string()),  # pulse | nearest | bicubic | ground-truth
        ("sample", pa.int32()),  # PULSE sample index; 0 for baselines
        ("seed", pa.int64()),  # PULSE sample seed; null otherwise
        ("converged", pa.bool_()),  # the search's verdict (unclamped best iterate); PULSE only
        ("steps_run", pa.int32()),  # optimiser steps of this sample; PULSE only
        ("input_steps", pa.int32()),  # steps of every attempt of the input (restarts counted)
        ("lr_mse", pa.float64()),  # DS(SR clamped) vs the LR the search saw (degraded)
        ("lr_psnr", pa.float64()),
        ("lr_mse_clean", pa.float64()),  # DS(SR clamped) vs the clean LR
        ("lr_psnr_clean", pa.float64()),
        ("within_eps", pa.bool_()),  # lr_mse <= eps
        ("psnr_gt", pa.float64()),  # against the ground truth: reported, never optimised
        ("ssim_gt", pa.float64()),
        ("diversity", pa.float64()),  # mean pairwise RMS between the input's samples
        ("niqe", pa.float64()),  # per image, when it has >= 2 96x96 blocks
        ("niqe_blocks", pa.list_(pa.float32())),  # its NIQE block features, flattened (n x 36)
        ("brisque", pa.float64()),
        ("identity", pa.float64()),  # dlib embedding distance to the ground truth
        ("seconds", pa.float64()),  # PULSE: this sample's share of the search time
    ]
)
LOSS_SCHEMA = pa.schema(
    [
        ("label", pa.string()),
        ("factor", pa.int32()),
        ("degradation", pa.string()),
        ("sample", pa.int32()),
        ("step", pa.int32()),
        ("mse", pa.float64()),
        ("total", pa.float64()),
    ]
)


@dataclass
class Tools:
    """The optional metrics' models, loaded once per process; `missing` says why one is absent."""

    niqe_params: dict[str, np.ndarray] | None = None
    brisque: Brisque | None = None
    embed: Embedder | None = None
    missing: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def load_tools(wanted: tuple[str, ...]) -> Tools:
    tools = Tools()
    if "niqe" in wanted:
        path = niqe_params_path()
        if path is None:
            tools.missing["niqe"] = "NIQE model not cached: `pulse models pull niqe`"
        else:
            tools.niqe_params = niqe.load_params(str(path))
    if "brisque" in wanted:
        tools.brisque, why = load_brisque()
        if why:
            tools.missing["brisque"] = why
    if "identity" in wanted:
        tools.embed, why = load_embedder()
        if why:
            tools.missing["identity"] = why
    return tools


@dataclass
class GroundTruth:
    key: str
    hr: torch.Tensor  # (3, R, R) in [0, 1]
    note: str  # how it was fitted to the generator's frame ("" = as is)


@dataclass
class BatchEval:
    """What one batch did (its rows are in its Parquet part)."""

    batch_id: str
    part_key: str
    losses_key: str
    ground_truths: int
    inputs: int  # restored LR inputs: ground truths x factors x degradations
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why not measured
    seconds: float = 0.0


def list_ground_truths(
    source: Storage, limit: int | None = None, dest: Storage | None = None
) -> list[str]:
    """Image keys under source, sorted; an evaluation's own outputs are never ground truths.

    With dest inside source (`gt/` and `gt/eval/`), everything under dest is skipped, so a
    second run does not evaluate the first run's samples and sheets.
    """
    src = source.url.rstrip("/")
    inside = ""
    if dest is not None and dest.url.rstrip("/").startswith(src + "/"):
        inside = dest.url.rstrip("/")[len(src) + 1 :] + "/"
    skip = (EVAL_PREFIX + "/", "samples/", "sheets/", "plots/")
    keys = sorted(
        info.key
        for info in source.list(suffixes=IMAGE_SUFFIXES)
        if not info.key.startswith(skip) and not (inside and info.key.startswith(inside))
    )
    return keys if limit is None else keys[:limit]


def fit_ground_truth(image: torch.Tensor, resolution: int) -> tuple[torch.Tensor, str]:
    """Centre-crop to a square and resize (Lanczos) to the generator's side; say what was done."""
    _, h, w = image.shape
    notes = []
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[:, top : top + side, left : left + side]
        notes.append(f"centre-cropped {w}x{h} to {side}x{side}")
    if image.shape[-1] != resolution:
        pil = to_pil(image).resize((resolution, resolution), Image.Resampling.LANCZOS)
        a = np.asarray(pil, dtype=np.float32) / 255.0
        notes.append(f"resized {image.shape[-1]} -> {resolution} (Lanczos)")
        image = torch.from_numpy(a.transpose(2, 0, 1).copy())
    return image, "; ".join(notes)


def read_ground_truths(
    keys: Sequence[str], source: Storage, resolution: int, max_pixels: int
) -> tuple[list[GroundTruth], list[tuple[str, str]]]:
    found, failed = [], []
    for key in keys:
        try:
            loaded = load_image(source.read_bytes(key), name=key, max_pixels=max_pixels)
        except PulseError as exc:
            if is_transient(exc):
                raise
            failed.append((key, str(exc)))
            continue
        hr, note = fit_ground_truth(loaded.tensor, resolution)
        found.append(GroundTruth(key, hr, note))
    return found, failed


@dataclass
class _Case:
    gt: GroundTruth
    factor: int
    degradation: str
    clean: torch.Tensor  # DS(GT), 8-bit
    seen: torch.Tensor  # the degraded copy: what the search gets


def make_cases(
    gts: Sequence[GroundTruth], settings: EvalSettings, resolution: int
) -> tuple[list[_Case], list[tuple[str, str]]]:
    """Every (ground truth, factor, degradation) LR input, seeded; bad factors are failures."""
    cases, failed = [], []
    for f in settings.factors:
        if resolution % f or resolution // f < 2:
            failed.append((f"x{f}", f"factor {f} does not divide resolution {resolution}"))
            continue
        for gt in gts:
            clean = metrics.quantise(downscale(gt.hr[None], f, settings.operator)[0])
            for deg in settings.degradations:
                seed = degradation_seed(settings.degrade_seed, gt.key, f, deg)
                cases.append(_Case(gt, f, deg, clean, degrade(clean, deg, seed)))
    return cases, failed


def _label(case: _Case) -> str:
    return f"x{case.factor}/{case.degradation}/{case.gt.key}"


def _decoded(case: _Case, resolution: int) -> DecodedInput:
    """The LR input as the pipeline decodes any file: PNG bytes -> load_image -> prepare_input."""
    label = _label(case)
    loaded = load_image(encode_png(case.seen), name=label)
    return DecodedInput(label, loaded, prepare_input(loaded, resolution, "none"))


def _realism(row: dict[str, Any], image: torch.Tensor, tools: Tools) -> None:
    if tools.niqe_params is not None:
        blocks = niqe.features(image, tools.niqe_params)
        row["niqe_blocks"] = blocks.astype(np.float32).ravel().tolist()
        if len(blocks) >= 2:
            row["niqe"] = niqe.score(blocks, tools.niqe_params)
    if tools.brisque is not None:
        row["brisque"] = tools.brisque(image)


def _row(
    run_id: str,
    case: _Case,
    method: str,
    image: torch.Tensor,
    eps: float,
    tools: Tools,
    operator: str,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": run_id,
        "input": case.gt.key,
        "label": _label(case),
        "factor": case.factor,
        "degradation": case.degradation,
        "method": method,
        "sample": 0,
        **metrics.lr_consistency(image, case.seen, case.clean, case.factor, operator, eps),
        "psnr_gt": metrics.psnr(image.clamp(0, 1), case.gt.hr),
        "ssim_gt": metrics.ssim(image.clamp(0, 1), case.gt.hr),
    }
    _realism(row, image, tools)
    if tools.embed is not None:
        row["identity"] = identity_distance(tools.embed, image, case.gt.hr)
    return row


def evaluate_batch(
    keys: Sequence[str],
    source: Storage,
    dest: Storage,
    settings: EvalSettings,
    *,
    run_id: str,
    batch_id: str,
    sheet_inputs: Collection[str] = (),
    generator: Generator | None = None,
    on_step: StepCallback | None = None,
) -> BatchEval:
    """Evaluate ground truths `keys`: write the batch's rows, losses, samples and sheets to dest."""
    started = time.perf_counter()
    restore = settings.restore.resolved()
    if generator is None:
        generator = load_generator(restore.model, pick_device(restore.device))
    tools = load_tools(tuple(settings.metrics))
    baselines, baselines_missing = upscalers(tuple(settings.baselines))
    res_side = generator.resolution
    eps, operator = restore.config.eps, settings.operator
    gts, failures = read_ground_truths(keys, source, res_side, restore.max_pixels)
    cases, bad = make_cases(gts, settings, res_side)
    failures += bad
    by_label = {_label(c): c for c in cases}
    restored, search_failed = restore_decoded(
        [_decoded(c, res_side) for c in cases], generator, restore, on_step
    )
    failures += [(f.key, f.reason) for f in search_failed]

    rows: list[dict[str, Any]] = []
    losses: list[dict[str, Any]] = []
    for gt in gts:
        row = {"run_id": run_id, "input": gt.key, "label": gt.key, "factor": 1}
        row |= {"degradation": "clean", "method": GROUND_TRUTH, "sample": 0}
        _realism(row, gt.hr, tools)
        rows.append(row)
    for d, res in restored:
        case = by_label[d.key]
        spread = metrics.diversity([s.hr for s in res.samples])
        for s in res.samples:
            row = _row(run_id, case, PULSE, s.hr, eps, tools, operator)
            row |= {
                "sample": s.index,
                "seed": s.seed,
                "converged": s.converged,
                "steps_run": s.steps_run,
                "input_steps": res.steps_spent,
                "diversity": spread,
                "seconds": s.seconds,
            }
            rows.append(row)
            mse_curve, total = s.history.get("MSE", []), s.history.get("TOTAL", [])
            losses += [
                {
                    "label": d.key,
                    "factor": case.factor,
                    "degradation": case.degradation,
                    "sample": s.index,
                    "step": i,
                    "mse": m,
                    "total": total[i] if i < len(total) else None,
                }
                for i, m in enumerate(mse_curve)
            ]
        ups = {name: up(case.seen, case.factor) for name, up in baselines.items()}
        rows += [_row(run_id, case, name, img, eps, tools, operator) for name, img in ups.items()]
        if settings.write_samples:
            write_outputs(dest, f"samples/{d.key}", res, generator.model_id)
        if case.gt.key in sheet_inputs:
            strip = input_strip(
                case,
                ups.get("bicubic"),
                [s.hr for s in res.samples],
                [s.converged for s in res.samples],
            )
            dest.write_bytes(f"sheets/{output_base(d.key)}.png", _png(strip), "image/png")
    missing = dict(tools.missing)
    missing |= baselines_missing
    part = f"{EVAL_PREFIX}/{run_id}/parts/{batch_id}.parquet"
    loss_part = f"{EVAL_PREFIX}/{run_id}/parts/{batch_id}-losses.parquet"
    write_parquet(dest, part, pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    write_parquet(dest, loss_part, pa.Table.from_pylist(losses, schema=LOSS_SCHEMA))
    return BatchEval(
        batch_id=batch_id,
        part_key=part,
        losses_key=loss_part,
        ground_truths=len(gts),
        inputs=len(restored),
        failures=failures,
        missing=missing,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------
# One input's strip for the contact sheets: LR | bicubic | samples | HR


CELL_MARGIN = 3
NOT_CONVERGED = (220, 0, 0)


def input_strip(
    case: _Case,
    bicubic: torch.Tensor | None,
    samples: Sequence[torch.Tensor],
    converged: Sequence[bool],
) -> Image.Image:
    """One row: the LR input (nearest-enlarged), bicubic, each sample (red frame: not within
    eps), the ground truth; a label line above each cell."""
    side = case.gt.hr.shape[-1]
    cells: list[tuple[str, torch.Tensor, bool]] = [(f"LR x{case.factor}", case.seen, True)]
    if bicubic is not None:
        cells.append(("bicubic", bicubic, True))
    cells += [
        (f"sample {i}", s, ok) for i, (s, ok) in enumerate(zip(samples, converged, strict=True))
    ]
    cells.append(("truth", case.gt.hr, True))
    font = ImageFont.load_default()
    text_h = 12
    width = len(cells) * (side + CELL_MARGIN) + CELL_MARGIN
    strip = Image.new("RGB", (width, side + text_h + 2 * CELL_MARGIN), (255, 255, 255))
    pen = ImageDraw.Draw(strip)
    for i, (label, img, ok) in enumerate(cells):
        x = CELL_MARGIN + i * (side + CELL_MARGIN)
        tile = to_pil(img.clamp(0, 1))
        if tile.size != (side, side):
            tile = tile.resize((side, side), Image.Resampling.NEAREST)
        strip.paste(tile, (x, text_h + CELL_MARGIN))
        pen.text((x, 1), label[: max(4, side // 6)], fill=(0, 0, 0), font=font)
        if not ok:
            y = text_h + CELL_MARGIN
            pen.rectangle((x - 1, y - 1, x + side, y + side), outline=NOT_CONVERGED, width=2)
    return strip


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def read_part(dest: Storage, key: str) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(dest.read_bytes(key)))


__all__ = [
    "EVAL_PREFIX",
    "GROUND_TRUTH",
    "LOSS_SCHEMA",
    "PULSE",
    "ROW_SCHEMA",
    "BatchEval",
    "GroundTruth",
    "Tools",
    "evaluate_batch",
    "fit_ground_truth",
    "input_strip",
    "list_ground_truths",
    "load_tools",
    "make_cases",
    "read_ground_truths",
]
