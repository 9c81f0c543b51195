"""Search modes on real faces: `pulse_core.evaluation` run once per mode, tables side by side.

A thin caller of the one evaluation code path (`pulse eval` runs the same): the faces come from
registry packages (`pulse_core.evaluation.faces`, split by index into `dev` and `held`), each
mode is an `EvalSettings` whose restore carries the mode's `SearchConfig`, and every number
(LR consistency, NIQE, BRISQUE, PSNR/SSIM, diversity, steps) is the evaluation's own.

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
from pulse_core.evaluation.faces import SPLITS, write_face_set  # noqa: E402
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
        Mode("plain-100", "plain 100", ref.with_(steps=steps(100))),
        Mode("plain-300", "plain 300", ref.with_(steps=steps(300))),
        Mode(
            "plain-es-restarts",
            "plain ES+ restarts",
            ref.with_(steps=steps(100), early_stop=True),
            3,
        ),
    ]
    for r in (0.02, 0.05, 0.1, 0.2, 0.3):
        out.append(Mode(f"inter-16x16-r{r:g}", f"16x16 r={r:g}", inter(("16x16",), r)))
    # Other split points: at a small radius (the candidate default) and at 0.2.
    for r, layer_sets in (
        (0.05, (("4x4",), ("8x8",), ("32x32",), ("8x8", "16x16"))),
        (0.2, (("8x8",), ("32x32",))),
    ):
        for layers in layer_sets:
            name = "+".join(layers)
            out.append(Mode(f"inter-{name}-r{r:g}", f"{name} r={r:g}", inter(layers, r)))
    out.append(
        Mode("inter-16x16-r0.05-restarts", "16x16 r=0.05 +restarts", inter(("16x16",), 0.05), 3)
    )
    # The product default as shipped (`pulse_core.preset(DEFAULT_PRESET)`), measured as it is:
    # its restarts come from the config's own `restart_budget`.
    try:
        from pulse_core.search import DEFAULT_PRESET, preset
    except ImportError:  # an older pulse_core without a default preset
        return out
    shipped = preset(DEFAULT_PRESET)
    shipped = shipped.with_(steps=steps(shipped.steps))
    out.append(Mode(f"preset-{DEFAULT_PRESET}", f"{DEFAULT_PRESET} (default)", shipped))
    return out


def resolved_layers(generator: Any, cfg: SearchConfig) -> tuple[str, ...]:
    """The split points a config really offsets (`("auto",)` resolved for this generator)."""
    names = tuple(cfg.intermediate_layers)
    if names == ("auto",):
        from pulse_core.layers import auto_layers

        return tuple(auto_layers(generator))
    return names


def config_summary(cfg: SearchConfig) -> dict[str, Any]:
    d = asdict(cfg)
    keep = (
        "steps",
        "early_stop",
        "intermediate_layers",
        "intermediate_radius",
        "intermediate_start",
        "eps",
        "learning_rate",
        "schedule",
        "loss",
        "restart_budget",
    )
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep if k in d}


# ---------------------------------------------------------------------------------------------
# Running and aggregating


def _r(x: float, digits: int = 5) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


@torch.no_grad()
def on_manifold(generator: Any, latents: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """G(latent) with no intermediate offsets, in [0, 1]."""
    lat = latents
    if lat.shape[1] == 1 and generator.num_latents > 1:
        lat = lat.expand(-1, generator.num_latents, -1)
    img = generator.synthesize(generator.prior(lat), noise)
    return ((img + 1) / 2).clamp(0, 1)


def sample_records(
    mode: str,
    size: int,
    faces: Sequence[Face],
    lrs: Sequence[torch.Tensor],
    results: Sequence[Any],
    generator: Any,
    realism: Realism | None,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    records, niqe_feats = [], []
    for face, lr, res in zip(faces, lrs, results, strict=True):
        samples = res.samples
        latents = torch.stack([s.latent for s in samples])
        noise = [torch.stack([s.noise[i] for s in samples]) for i in range(len(samples[0].noise))]
        plain = on_manifold(generator, latents, noise)
        for s, g_img in zip(samples, plain, strict=True):
            hr = s.hr.clamp(0, 1)
            down = downscale(hr[None], HR_SIZE // size, "bicubic")[0]
            rec = {
                "mode": mode,
                "size": size,
                "input": face.key,
                "colour": face.colour,
                "sample": s.index,
                "converged": bool(s.converged),
                "lr_mse": _r(s.mse),
                "lr_psnr": _r(psnr(down, lr)),
                "psnr_gt": _r(psnr(hr, face.hr)),
                "ssim_gt": _r(ssim(hr, face.hr)),
                "off_manifold": _r(float((hr - g_img).pow(2).mean().sqrt()) * 255),
                "steps_run": s.steps_run,
                "input_steps": res.steps_spent,
                "input_attempts": len(res.attempts),
            }
            if realism is not None:
                rec["brisque"] = _r(realism.brisque(hr))
                niqe_feats.append(realism.niqe_features(hr))
            records.append(rec)
    return records, niqe_feats


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return _r(statistics.fmean(v)) if v else None


def _median(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return _r(statistics.median(v)) if v else None


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-sample records of one (mode, size): shares, means, medians."""
    by_input: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_input.setdefault(r["input"], []).append(r)
    inputs = list(by_input.values())

    def share(pred: Iterable[bool], n: int) -> float | None:
        return _r(sum(pred) / n, 4) if n else None

    colour = [g for g in inputs if g[0].get("colour")]
    grey = [g for g in inputs if not g[0].get("colour")]
    out: dict[str, Any] = {
        "inputs": len(inputs),
        "samples": len(records),
    }
    if records and all("converged" in r for r in records):
        out["inputs_converged"] = share(
            (any(r["converged"] for r in g) for g in inputs), len(inputs)
        )
        out["inputs_all_converged"] = share(
            (all(r["converged"] for r in g) for g in inputs), len(inputs)
        )
        out["samples_converged"] = share((r["converged"] for r in records), len(records))
        out["inputs_converged_colour"] = share(
            (any(r["converged"] for r in g) for g in colour), len(colour)
        )
        out["inputs_converged_lfw"] = share(
            (any(r["converged"] for r in g) for g in grey), len(grey)
        )
    for key in ("lr_mse", "lr_psnr", "psnr_gt", "ssim_gt", "off_manifold", "brisque"):
        vals = [r.get(key) for r in records]
        if any(v is not None for v in vals):
            out[f"{key}_mean"] = _mean(vals)
            out[f"{key}_median"] = _median(vals)
    steps = [g[0]["input_steps"] for g in inputs if "input_steps" in g[0]]
    if steps:
        out["steps_per_input"] = _mean(steps)
        out["restarts_per_input"] = _mean([g[0]["input_attempts"] - SAMPLES for g in inputs])
    return out


def baseline_records(
    name: str,
    size: int,
    faces: Sequence[Face],
    lrs: Sequence[torch.Tensor],
    images: Sequence[torch.Tensor],
    realism: Realism | None,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    records, feats = [], []
    for face, lr, img in zip(faces, lrs, images, strict=True):
        down = downscale(img[None], HR_SIZE // size, "bicubic")[0]
        rec = {
            "mode": name,
            "size": size,
            "input": face.key,
            "colour": face.colour,
            "sample": 0,
            "converged": float((down - lr).pow(2).mean()) <= SearchConfig().eps,
            "lr_mse": _r(float((down - lr).pow(2).mean())),
            "lr_psnr": _r(psnr(down, lr)),
            "psnr_gt": _r(psnr(img, face.hr)),
            "ssim_gt": _r(ssim(img, face.hr)),
        }
        if realism is not None:
            rec["brisque"] = _r(realism.brisque(img))
            feats.append(realism.niqe_features(img))
        records.append(rec)
    return records, feats


def bicubic_up(lr: torch.Tensor) -> torch.Tensor:
    return _quantise(F.interpolate(lr[None], size=HR_SIZE, mode="bicubic", align_corners=False)[0])


def evaluate_size(
    size: int,
    faces: Sequence[Face],
    generator: Any,
    mode_list: Sequence[Mode],
    realism: Realism | None,
) -> dict[str, Any]:
    lrs = [make_lr(f.hr, size) for f in faces]
    keys = [f.key for f in faces]
    summaries: dict[str, Any] = {}
    all_records: list[dict[str, Any]] = []
    sheet_images: dict[str, list[tuple[torch.Tensor, bool]]] = {}

    # Baselines: the truth, bicubic upsampling, unconstrained generator samples (2 per face).
    torch.manual_seed(SEED)
    with torch.no_grad():
        z = torch.randn(len(faces) * SAMPLES, generator.num_latents, generator.latent_dim)
        gen = _quantise((generator.synthesize(generator.prior(z), []) + 1) / 2)
    baselines = {
        "ground-truth": [f.hr for f in faces],
        "bicubic": [bicubic_up(lr) for lr in lrs],
        "generator-samples": list(gen[: len(faces)]),
    }
    for name, images in baselines.items():
        recs, feats = baseline_records(name, size, faces, lrs, images, realism)
        if name == "generator-samples":  # no relation to the inputs: realism only
            recs2, feats2 = baseline_records(
                name, size, faces, lrs, list(gen[len(faces) :]), realism
            )
            recs, feats = recs + recs2, feats + feats2
            for r in recs:
                for k in ("converged", "lr_mse", "lr_psnr", "psnr_gt", "ssim_gt"):
                    r.pop(k, None)
        summary = summarise(recs)
        if realism is not None:
            summary["niqe"] = _r(realism.niqe(feats))
        summaries[name] = summary
        all_records += recs
        sheet_images[name] = [(img, True) for img in images]

    # Warm-up (first-call costs: allocator, kernels), so that the first mode's time is fair.
    restore_many(lrs, generator, 1, keys=keys, config=SearchConfig(steps=3), seed=SEED)
    for mode in mode_list:
        t0 = time.perf_counter()
        results = restore_many(
            lrs,
            generator,
            SAMPLES,
            keys=keys,
            config=mode.search_config(),
            seed=SEED,
        )
        wall = time.perf_counter() - t0
        recs, feats = sample_records(mode.name, size, faces, lrs, results, generator, realism)
        summary = summarise(recs)
        summary["seconds_per_input"] = _r(wall / len(faces), 3)
        summary["wall_seconds"] = _r(wall, 4)
        if realism is not None:
            summary["niqe"] = _r(realism.niqe(feats))
        summaries[mode.name] = summary
        all_records += recs
        sheet_images[mode.name] = [(r.samples[0].hr, r.samples[0].converged) for r in results]
        print(
            f"  {size:>2}x{size:<2} {mode.name:<28} inputs conv {summary['inputs_converged']:.2f}"
            f"  samples conv {summary['samples_converged']:.2f}"
            f"  LR PSNR {summary['lr_psnr_median']:.1f} dB"
            f"  BRISQUE {summary.get('brisque_mean') or math.nan:.1f}"
            f"  NIQE {summary.get('niqe') or math.nan:.2f}"
            f"  off-manifold {summary['off_manifold_mean']:.2f}"
            f"  steps/input {summary['steps_per_input']:.0f}  {wall:.0f} s",
            flush=True,
        )
    return {
        "summaries": summaries,
        "records": all_records,
        "sheet": sheet_images,
        "lrs": lrs,
    }


# ---------------------------------------------------------------------------------------------
# Contact sheet


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def grid_sheet(
    columns: Sequence[tuple[str, Sequence[tuple[torch.Tensor, bool]]]],
    rows: Sequence[int],
    row_labels: Sequence[str],
) -> Image.Image:
    """Rows = inputs, columns = (label, [(image, converged)] per input); red frame = not converged."""
    cell, m = HR_SIZE, 3
    font = ImageFont.load_default()
    pen0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(label, pen0, font, cell) for label, _ in columns]
    line_h = int(pen0.textbbox((0, 0), "Ag|", font=font)[3]) + 1
    head = max(len(w) for w in wrapped) * line_h + m
    left = max(int(pen0.textlength(t, font=font)) for t in row_labels) + 2 * m
    width = left + len(columns) * (cell + m) + m
    height = head + len(rows) * (cell + m) + m
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for c, lines in enumerate(wrapped):
        x = left + c * (cell + m)
        for i, line in enumerate(lines):
            pen.text((x, m + i * line_h), line, fill=(0, 0, 0), font=font)
    for r, idx in enumerate(rows):
        y = head + r * (cell + m)
        pen.text((m, y + cell // 2 - line_h // 2), row_labels[r], fill=(0, 0, 0), font=font)
        for c, (_, images) in enumerate(columns):
            img, ok = images[idx]
            x = left + c * (cell + m)
            tile = _to_pil(img)
            if tile.size != (cell, cell):
                tile = tile.resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (x, y))
            if not ok:
                pen.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(220, 0, 0), width=2)
    return sheet


def _to_pil(t: torch.Tensor) -> Image.Image:
    a = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(a))


# Only public-domain photos in the committed sheets (LFW photos belong to their authors).
SHEET_SKIP = ("inter-4x4-r0.05", "inter-8x8-r0.2")  # in the tables only: keeps the PNGs small
SHEET_ROWS = ("astronaut", "grace-hopper", "biden", "obama", "obama2", "obama3")


def write_sheet(out: Path, size: int, faces: Sequence[Face], run: dict[str, Any]) -> Path:
    keys = [f.key for f in faces]
    rows = [keys.index(k) for k in SHEET_ROWS if k in keys] or list(range(min(6, len(faces))))
    sheet = run["sheet"]
    labels = {m.name: m.label for m in modes()}
    columns: list[tuple[str, Sequence[tuple[torch.Tensor, bool]]]] = [
        ("truth 64x64", sheet["ground-truth"]),
        (f"input {size}x{size}", [(lr, True) for lr in run["lrs"]]),
        ("bicubic", sheet["bicubic"]),
    ]
    skip = ("ground-truth", "bicubic", "generator-samples", *SHEET_SKIP)
    columns += [(labels.get(name, name), imgs) for name, imgs in sheet.items() if name not in skip]
    img = grid_sheet(columns, rows, [keys[i] for i in rows])
    path = out / f"sheet-{size}.png"
    img.save(path, optimize=True)
    return path


# ---------------------------------------------------------------------------------------------
# Tables


TABLE_COLUMNS = (
    ("inputs_converged", "inputs conv.", "{:.0%}"),
    ("samples_converged", "samples conv.", "{:.0%}"),
    ("inputs_converged_colour", "colour inputs conv.", "{:.0%}"),
    ("lr_mse_median", "LR MSE median", "{:.2e}"),
    ("lr_psnr_median", "LR PSNR median (dB)", "{:.1f}"),
    ("brisque_mean", "BRISQUE mean", "{:.1f}"),
    ("niqe", "NIQE (set)", "{:.2f}"),
    ("off_manifold_mean", "off-manifold RMS (8-bit)", "{:.1f}"),
    ("psnr_gt_mean", "PSNR vs GT (dB)", "{:.2f}"),
    ("ssim_gt_mean", "SSIM vs GT", "{:.3f}"),
    ("steps_per_input", "steps / input", "{:.0f}"),
    ("seconds_per_input", "s / input", "{:.2f}"),
)


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    head = "| mode | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |"
    sep = "|---|" + "---|" * len(TABLE_COLUMNS)
    lines = [head, sep]
    for name, s in summaries.items():
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            v = s.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(out: Path) -> None:
    files = sorted(out.glob("results-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise SystemExit(f"no results-*.json in {out}")
    for f in files:
        data = load_results(f)
        print(f"\n### {data['size']}x{data['size']} inputs (factor {HR_SIZE // data['size']})\n")
        print(markdown_table(data["summaries"]))


# ---------------------------------------------------------------------------------------------


RECORD_COLUMNS = (
    "mode",
    "input",
    "sample",
    "converged",
    "lr_mse",
    "lr_psnr",
    "psnr_gt",
    "ssim_gt",
    "brisque",
    "off_manifold",
    "steps_run",
    "input_steps",
    "input_attempts",
)


def dump_results(data: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """Readable JSON for the summaries, one compact line per sample record."""
    data = {**data, "record_columns": list(RECORD_COLUMNS)}
    data.pop("records", None)
    head = json.dumps(data, indent=1)
    rows = ",\n".join(json.dumps([r.get(c) for c in RECORD_COLUMNS]) for r in records)
    return head[:-2] + ',\n "records": [\n' + rows + "\n ]\n}\n"


def load_results(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    cols = data.get("record_columns")
    if cols:
        data["records"] = [dict(zip(cols, row, strict=True)) for row in data["records"]]
    return data


def machine() -> dict[str, Any]:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="8,16", help="LR sizes, comma-separated (default 8,16)")
    p.add_argument("--lfw", type=int, default=DEFAULT_LFW, help="LFW faces (first N of 100)")
    p.add_argument("--modes", default="", help="mode names, comma-separated (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default docs/evaluation)")
    p.add_argument(
        "--assets", type=Path, default=None, help="asset cache (default $PULSE_CACHE/eval-assets)"
    )
    p.add_argument(
        "--brisque-models", type=Path, default=None, help="folder with brisque_*_live.yml"
    )
    p.add_argument("--offline", action="store_true", help="never download assets")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 faces, 1/10 of the steps")
    p.add_argument("--table", action="store_true", help="print markdown tables from --out and exit")
    args = p.parse_args(argv)

    out = args.out
    if out is None:
        out = (
            Path(tempfile.mkdtemp(prefix="pulse-eval-quick-"))
            if args.quick
            else REPO_ROOT / "docs" / "evaluation"
        )
    if args.table:
        print_tables(out)
        return 0
    require_brisque()  # fail early and clearly, before any download or search
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    n_lfw = 2 if args.quick else args.lfw
    mode_list = modes(0.1 if args.quick else 1.0)
    if args.modes:
        wanted = set(args.modes.split(","))
        unknown = wanted - {m.name for m in mode_list}
        if unknown:
            raise SystemExit(
                f"unknown modes {sorted(unknown)}; known: {[m.name for m in mode_list]}"
            )
        mode_list = [m for m in mode_list if m.name in wanted]

    assets = fetch_assets(
        asset_dir(args.assets),
        ["lfw", *WHITE_HOUSE_EYES, "niqe", "brisque_model", "brisque_range"],
        offline=args.offline,
        brisque_models=args.brisque_models,
    )
    faces = load_faces(assets, n_lfw)
    if args.quick:
        faces = [f for f in faces if f.key in ("astronaut", "biden") or not f.colour]
    realism = Realism(assets)
    generator = load_generator("demo")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(faces)} faces, sizes {sizes}, {len(mode_list)} modes -> {out}", flush=True)
    for size in sizes:
        started = time.time()
        run = evaluate_size(size, faces, generator, mode_list, realism)
        sheet = write_sheet(out, size, faces, run)
        data = {
            "size": size,
            "factor": HR_SIZE // size,
            "generator": generator.describe(),
            "samples_per_input": SAMPLES,
            "seed": SEED,
            "eps": SearchConfig().eps,
            "quick": args.quick,
            "faces": [{"key": f.key, "source": f.source, "colour": f.colour} for f in faces],
            "modes": [
                {
                    "name": m.name,
                    "config": config_summary(m.config),
                    "layers": list(resolved_layers(generator, m.config)),
                    "step_budget": m.step_budget(),
                }
                for m in mode_list
            ],
            "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 1),
            "summaries": run["summaries"],
            "records": "below, one row per sample: see record_columns",
        }
        path = out / f"results-{size}.json"
        path.write_text(dump_results(data, run["records"]))
        print(f"wrote {path} and {sheet}", flush=True)
        print(markdown_table(run["summaries"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
