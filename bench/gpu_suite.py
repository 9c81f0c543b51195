"""The GPU suite: search speed and peak memory of every StyleGAN family, in one command.

Development and CI machines have no GPU, so everything GPU-specific is measured by this one
script when a CUDA machine is at hand (docs/benchmarks.md, "Memory and precision"):

    python bench/gpu_suite.py --device cuda --out gpu-results/          # the full grid
    python bench/gpu_suite.py --device cuda --weights ffhq-1024.pkl     # a real model file
    python bench/gpu_suite.py --device cpu --quick --out suite-quick     # what the tests run

Grid (full mode): StyleGAN v1/2/3 at 256 and 1024 (random weights at the release
architecture: speed and memory do not depend on the weights) x batch 1/8/16 x precision
fp32/bf16/fp16 x compile off/on; checkpointing "auto" (`--checkpoint` to force). Each cell
runs `pulse_core.search.search` (the reference numerics, `steps` changed) on random LR targets:
`--warmup` steps, then timed steps; reports ms per step (median), samples/s for complete
100-step searches (batch / (100 x median step)), the seconds per 100-step sample, and peak
memory (CUDA: `max_memory_allocated` of the cell; CPU: the process's peak RSS so far, so
on the CPU run one cell per process for a true peak). A cell that does not fit is recorded as
"oom", not a crash. Then the pipeline (`pulse_core.pipeline.process_batch`) on a Dask cluster
with one worker per GPU (`CUDA_VISIBLE_DEVICES` per worker; one in-process worker on the CPU):
inputs and samples per second.

Goal (issue 13): 0.25 s per 100-step 1024 px sample at batch 16 on one H100-class GPU; the
markdown table marks the 1024 batch-16 rows against it.

`--precision-check N`: fp32 vs bf16 (vs fp16 on CUDA) convergence, LR error and realism
(NIQE) over N own samples of the demo generator and a random StyleGAN2.

`--quick` (CPU, in the test suite so it never rots): tiny random StyleGANs at 32 px, batch 1/2,
fp32/bf16 (fp16 on CUDA only), 2+2 steps, compile off, and the pipeline on 2 tiny inputs.
Writes `gpu_suite.json` and `gpu_suite.md` under `--out`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python bench/gpu_suite.py` from a checkout

FAMILIES = ("stylegan1", "stylegan2", "stylegan3")
FULL = {
    "resolutions": (256, 1024),
    "batches": (1, 8, 16),
    "precisions": ("fp32", "bf16", "fp16"),
    "compile": (False, True),
    "warmup": 3,
    "steps": 10,
}
QUICK = {
    "resolutions": (32,),
    "batches": (1, 2),
    "precisions": ("fp32", "bf16"),
    "compile": (False,),
    "warmup": 2,
    "steps": 2,
}
GOAL_S_PER_SAMPLE = 0.25  # 100-step 1024 px sample at batch 16, one H100-class GPU
REFERENCE_STEPS = 100
LR_FACTOR = 8  # LR side = resolution / 8 (32 px for 256, 128 px for 1024; 4 px for 32)


# ----------------------------------------------------------------------------
# Generators


def build_generator(family: str, resolution: int, device: str, weights: str | None = None):
    """A frozen generator: the user's weights, or random weights at the release architecture
    (tiny channels below 64 px, for the quick mode)."""
    import torch

    from pulse_core.generators.gaussian_fit import GaussianFit

    if weights:
        from pulse_core.generators.loading import load_generator

        return load_generator(weights, torch.device(device), allow_download=False)
    tiny = resolution < 64
    w_dim = 32 if tiny else 512
    torch.manual_seed(0)
    fit = GaussianFit(torch.zeros(w_dim), torch.ones(w_dim))
    if family == "stylegan1":
        from pulse_core.generators.stylegan1 import StyleGAN1Generator, StyleGAN1Synthesis

        n_blocks = resolution.bit_length() - 2
        channels = [16] * n_blocks if tiny else None
        synthesis = StyleGAN1Synthesis(resolution, channels=channels, w_dim=w_dim)
        gen = StyleGAN1Generator(synthesis, fit.mean, fit.std)
    else:
        dims: dict[str, Any] = {
            "z_dim": w_dim,
            "c_dim": 0,
            "w_dim": w_dim,
            "img_resolution": resolution,
            "img_channels": 3,
            "mapping_kwargs": {"num_layers": 2},
        }
        synth = {"channel_base": 1024, "channel_max": 32} if tiny else {}
        synth = {"channel_base": 32768, "channel_max": 512, **synth}
        if family == "stylegan2":
            from pulse_core.generators.stylegan2 import StyleGAN2Generator

            gen = StyleGAN2Generator.from_init_kwargs({**dims, "synthesis_kwargs": synth})
            gen.set_gaussian_fit(fit)
        else:
            from pulse_core.generators.stylegan3 import StyleGAN3Generator

            kwargs = {**dims, **synth, **({"num_layers": 6} if tiny else {})}
            mapping, synthesis3 = StyleGAN3Generator.build(kwargs)
            gen = StyleGAN3Generator(mapping, synthesis3, fit, kwargs)
    gen.model_id = f"random-{family}-{resolution}"
    return gen.to(device).freeze()


# ----------------------------------------------------------------------------
# One cell


def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:  # this process image's own peak; ru_maxrss would include a large parent's (exec)
        status = Path("/proc/self/status").read_text().split("VmHWM:", 1)[1]
        return int(status.split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(
    gen,
    batch: int,
    precision: str,
    compile: bool,
    checkpoint: str,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """One (generator, batch, precision, compile) cell; 'oom' instead of a crash."""
    import torch

    from pulse_core.memory import is_out_of_memory, plan_batch
    from pulse_core.search import Execution, SearchConfig, initial_state, search

    device = str(gen.device)
    lr = gen.resolution // LR_FACTOR
    row: dict[str, Any] = {
        "generator": gen.model_id,
        "family": gen.family,
        "resolution": gen.resolution,
        "batch": batch,
        "precision": precision,
        "compile": compile,
    }
    if precision == "fp16" and not device.startswith("cuda"):
        return {**row, "status": "skipped", "reason": "fp16 needs a GPU"}
    g = torch.Generator().manual_seed(batch)
    targets = torch.rand(batch, 3, lr, lr, generator=g)
    config = SearchConfig.reference().with_(steps=steps)
    init = initial_state(gen, [1000 * batch + i for i in range(batch)], config)
    plan = plan_batch(gen, batch, batch=batch, checkpoint=checkpoint, precision=precision)
    execution = Execution(
        precision=precision,  # type: ignore[arg-type]
        checkpoint="on" if plan.checkpoint else "off",
        compile=compile,
    )

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    stamps: list[float] = []

    def on_step(step: int, total: int, converged: torch.Tensor) -> None:
        sync()
        stamps.append(time.perf_counter())

    try:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        search(gen, targets, init, config.with_(steps=warmup), execution=execution)
        sync()
        first = time.perf_counter() - t0  # includes compilation when compile is on
        stamps.append(time.perf_counter())
        out = search(gen, targets, init, config, execution=execution, on_step=on_step)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        return {**row, "status": "oom", "reason": str(exc).splitlines()[0][:200]}
    per_step = [b - a for a, b in itertools.pairwise(stamps)]
    median = statistics.median(per_step)
    return {
        **row,
        "status": "ok",
        "checkpoint": out.checkpointed,
        "estimate_gb": round((plan.estimate or 0) / 2**30, 3) if plan.estimate else None,
        "warmup_s": round(first, 3),
        "step_ms_median": round(median * 1000, 2),
        "step_ms_min": round(min(per_step) * 1000, 2),
        "samples_per_s": round(batch / (REFERENCE_STEPS * median), 4),
        "s_per_100_step_sample": round(REFERENCE_STEPS * median / batch, 4),
        "peak_gb": round(peak_bytes(device) / 2**30, 3),
    }


# ----------------------------------------------------------------------------
# The pipeline, one Dask worker per GPU


_WORKER_GENERATORS: dict[tuple[str, int, str | None], Any] = {}


def _pipeline_task(
    family: str,
    resolution: int,
    weights: str | None,
    keys: list[str],
    source: str,
    dest: str,
    settings: Any,
    batch_id: str,
) -> dict[str, Any]:
    """On a worker: build (once) the generator on its GPU, then `process_batch` the keys."""
    import torch

    from pulse_core.pipeline import process_batch
    from pulse_core.storage import LocalStorage

    device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (family, resolution, weights)
    if key not in _WORKER_GENERATORS:
        _WORKER_GENERATORS[key] = build_generator(family, resolution, device, weights)
    gen = _WORKER_GENERATORS[key]
    t0 = time.perf_counter()
    out = process_batch(
        keys,
        LocalStorage(Path(source)),
        LocalStorage(Path(dest)),
        settings,
        run_id="gpu-suite",
        batch_id=batch_id,
        generator=gen,
    )
    return {"seconds": time.perf_counter() - t0, "inputs": len(out.inputs), "device": device}


def run_pipeline(
    family: str,
    resolution: int,
    weights: str | None,
    inputs: int,
    samples: int,
    steps: int,
    precision: str,
) -> dict[str, Any]:
    """`inputs` random LR images through `process_batch` on one Dask worker per GPU."""
    import numpy as np
    import torch
    from dask.distributed import Client, LocalCluster, Nanny, SpecCluster
    from PIL import Image

    from pulse_core.settings import build_settings

    gpus = torch.cuda.device_count()
    lr = resolution // LR_FACTOR
    with tempfile.TemporaryDirectory() as tmp:
        source, dest = Path(tmp, "source"), Path(tmp, "dest")
        source.mkdir()
        rng = np.random.default_rng(0)
        keys = []
        for i in range(inputs):
            pixels = rng.integers(0, 256, (lr, lr, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(source / f"in-{i:03d}.png")
            keys.append(f"in-{i:03d}.png")
        settings = build_settings(
            "reference",
            {"steps": steps},
            samples=samples,
            model=weights or f"random-{family}-{resolution}",
            precision=precision,
        )
        if gpus:
            env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
            workers = {
                f"gpu{i}": {
                    "cls": Nanny,
                    "options": {"nthreads": 1, "env": {**env, "CUDA_VISIBLE_DEVICES": str(i)}},
                }
                for i in range(gpus)
            }
            cluster: Any = SpecCluster(workers=workers, scheduler=_scheduler_spec())
        else:
            cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False)
        with cluster, Client(cluster) as client:
            n = max(1, gpus)
            chunks = [keys[i::n] for i in range(n)]
            t0 = time.perf_counter()
            futures = [
                client.submit(
                    _pipeline_task,
                    family,
                    resolution,
                    weights,
                    chunk,
                    str(source),
                    str(dest),
                    settings,
                    f"batch-{i}",
                    pure=False,
                )
                for i, chunk in enumerate(chunks)
                if chunk
            ]
            done = client.gather(futures)
            wall = time.perf_counter() - t0
    return {
        "generator": f"{family}-{resolution}" if not weights else Path(weights).name,
        "workers": max(1, gpus),
        "devices": sorted({d["device"] for d in done}),
        "inputs": inputs,
        "samples": samples,
        "steps": steps,
        "precision": precision,
        "seconds": round(wall, 3),
        "inputs_per_s": round(inputs / wall, 4),
        "samples_per_s": round(inputs * samples / wall, 4),
    }


def _scheduler_spec() -> dict[str, Any]:
    from dask.distributed import Scheduler

    return {"cls": Scheduler, "options": {"dashboard_address": ":0"}}


# ----------------------------------------------------------------------------
# Precision: does a lower precision find the same samples?


def precision_check(device: str, inputs: int, steps: int) -> list[dict[str, Any]]:
    """fp32 vs bf16 (and fp16 on CUDA) on the demo generator (if cached) and a random
    StyleGAN2 (32 px, tiny, with its Gaussian fit): `inputs` LR images of each generator's own samples (factor 4),
    the reference search from the same starts. Per precision: share converged within eps,
    median LR MSE, mean GEOCROSS, the RMS difference of the HR samples to fp32's, and NIQE of
    the set (realism; lower is better; when `pulse models pull niqe` cached its parameters)."""
    import numpy as np
    import torch

    from pulse_core.downscale import downscale
    from pulse_core.errors import ModelFileError
    from pulse_core.generators.loading import load_generator
    from pulse_core.search import Execution, SearchConfig, initial_state, search

    niqe_params = None
    try:
        from pulse_core.evaluation.assets import niqe_params_path
        from pulse_core.evaluation.niqe import features, load_params, score

        path = niqe_params_path()
        niqe_params = load_params(str(path)) if path is not None else None
    except ImportError:
        pass
    gens: list[Any] = []
    try:
        gens.append(load_generator("demo", torch.device(device)))
    except ModelFileError:
        print("precision check: demo generator not cached (pulse models pull demo); skipped")
    sg2 = build_generator("stylegan2", 32, device)
    sg2.set_gaussian_fit(sg2.compute_gaussian_fit(samples=5000))  # a real fit: reachable targets
    gens.append(sg2)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.startswith("cuda") else [])
    rows = []
    for gen in gens:
        config = SearchConfig.reference().with_(steps=steps)
        start = initial_state(gen, list(range(10_000, 10_000 + inputs)), config)
        with torch.no_grad():
            hr = (gen.synthesize(gen.prior(start.latent.to(gen.device)), start.noise) + 1) / 2
        targets = downscale(hr, 4).clamp(0, 1).cpu()
        init = initial_state(gen, list(range(inputs)), config)
        reference = None
        for precision in precisions:
            t0 = time.perf_counter()
            out = search(gen, targets, init, config, execution=Execution(precision=precision))
            seconds = time.perf_counter() - t0
            images = out.hr.clamp(0, 1)
            if reference is None:
                reference = images
            row = {
                "generator": gen.model_id,
                "precision": precision,
                "inputs": inputs,
                "steps": steps,
                "converged": int(out.converged.sum()),
                "converged_share": round(float(out.converged.float().mean()), 3),
                "lr_mse_median": float(out.mse.median()),
                "geocross_mean": float(out.terms["GEOCROSS"].mean())
                if "GEOCROSS" in out.terms
                else None,
                "hr_rms_vs_fp32": round(float((images - reference).square().mean().sqrt()), 5),
                "seconds": round(seconds, 2),
            }
            if niqe_params is not None:
                feats = np.concatenate([features(img, niqe_params) for img in images])
                row["niqe_set"] = round(score(feats, niqe_params), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def precision_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| generator | precision | converged | median LR MSE | mean GEOCROSS | HR RMS vs fp32 "
        "| NIQE (set) | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        geo = f"{r['geocross_mean']:.4f}" if r["geocross_mean"] is not None else "-"
        lines.append(
            f"| {r['generator']} | {r['precision']} | {r['converged']}/{r['inputs']} | "
            f"{r['lr_mse_median']:.3e} | {geo} | {r['hr_rms_vs_fp32']:.4f} | "
            f"{r.get('niqe_set', '-')} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Report


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def markdown(rows: list[dict[str, Any]], pipeline: list[dict[str, Any]]) -> str:
    lines = [
        "| generator | batch | precision | compile | checkpoint | ms/step | samples/s "
        "(100 steps) | s per 100-step sample | peak GB | estimate GB | status |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['generator']} | {r['batch']} | {r['precision']} | {r['compile']} | - | - "
                f"| - | - | - | - | {r['status']}: {r.get('reason', '')} |"
            )
            continue
        goal = ""
        if r["resolution"] == 1024 and r["batch"] == 16:
            met = r["s_per_100_step_sample"] <= GOAL_S_PER_SAMPLE
            goal = f" (goal {GOAL_S_PER_SAMPLE} s: {'met' if met else 'missed'})"
        lines.append(
            f"| {r['generator']} | {r['batch']} | {r['precision']} | {r['compile']} | "
            f"{r['checkpoint']} | {r['step_ms_median']:.1f} | {r['samples_per_s']:.4g} | "
            f"{r['s_per_100_step_sample']:.4g}{goal} | {r['peak_gb']:.2f} | "
            f"{r['estimate_gb'] if r['estimate_gb'] is not None else '-'} | ok |"
        )
    if pipeline:
        lines += [
            "",
            "| pipeline generator | workers | devices | inputs x samples | steps | seconds | "
            "inputs/s | samples/s |",
            "|---|---:|---|---|---:|---:|---:|---:|",
        ]
        for p in pipeline:
            lines.append(
                f"| {p['generator']} | {p['workers']} | {', '.join(p['devices'])} | "
                f"{p['inputs']} x {p['samples']} | {p['steps']} | {p['seconds']:.2f} | "
                f"{p['inputs_per_s']:.4g} | {p['samples_per_s']:.4g} |"
            )
    return "\n".join(lines) + "\n"


def _csv(text: str, kind: type) -> tuple[Any, ...]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if kind is bool:
        return tuple(v in ("on", "1", "true") for v in values)
    return tuple(kind(v) for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny generators, few steps")
    parser.add_argument("--out", type=Path, default=Path("gpu-suite"), help="output folder")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--resolutions", help="e.g. 256,1024")
    parser.add_argument("--batches", help="e.g. 1,8,16")
    parser.add_argument("--precisions", help="e.g. fp32,bf16,fp16")
    parser.add_argument("--compile", help="off,on")
    parser.add_argument("--checkpoint", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per cell")
    parser.add_argument(
        "--weights", help="a StyleGAN model file: measured instead of the random generators"
    )
    parser.add_argument("--no-pipeline", action="store_true", help="skip the Dask pipeline")
    parser.add_argument(
        "--precision-check",
        type=int,
        metavar="INPUTS",
        help="only compare precisions' convergence and realism over INPUTS own samples",
    )
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    grid = dict(QUICK if args.quick else FULL)
    for name, kind in (("resolutions", int), ("batches", int), ("precisions", str)):
        if getattr(args, name):
            grid[name] = _csv(getattr(args, name), kind)
    if args.compile:
        grid["compile"] = _csv(args.compile, bool)
    grid["warmup"] = args.warmup if args.warmup is not None else grid["warmup"]
    grid["steps"] = args.steps if args.steps is not None else grid["steps"]

    if args.precision_check:
        checked = precision_check(args.device, args.precision_check, args.steps or 100)
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine_info(args.device), "precision_check": checked}
        (args.out / "precision_check.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "precision_check.md").write_text(precision_markdown(checked))
        print(precision_markdown(checked))
        return 0
    rows: list[dict[str, Any]] = []
    models: list[tuple[str, int]] = []
    if args.weights:
        gen = build_generator("", 0, args.device, args.weights)
        models = [(gen.family, gen.resolution)]
    else:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        models = [(f, r) for r in grid["resolutions"] for f in families]
    print(f"gpu_suite: {len(models)} generator(s) on {args.device}", flush=True)
    for family, res in models:
        gen = build_generator(family, res, args.device, args.weights)
        for batch, precision, comp in itertools.product(
            grid["batches"], grid["precisions"], grid["compile"]
        ):
            row = measure(
                gen, batch, precision, comp, args.checkpoint, grid["warmup"], grid["steps"]
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        del gen
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    pipeline: list[dict[str, Any]] = []
    if not args.no_pipeline:
        family, res = models[-1] if args.quick else models[0]
        if not args.quick and not args.weights:
            family, res = "stylegan2", 1024
        inputs = 2 if args.quick else 8 * max(1, torch.cuda.device_count())
        pipeline.append(
            run_pipeline(
                family,
                res,
                args.weights,
                inputs=inputs,
                samples=1 if args.quick else 4,
                steps=grid["steps"] if args.quick else REFERENCE_STEPS,
                precision="fp32",
            )
        )
        print(json.dumps(pipeline[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_info(args.device),
        "command": [Path(sys.executable).name, *sys.argv],
        "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
        "results": rows,
        "pipeline": pipeline,
        "goal_s_per_sample_1024_batch16": GOAL_S_PER_SAMPLE,
    }
    (args.out / "gpu_suite.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "gpu_suite.md").write_text(markdown(rows, pipeline))
    print(markdown(rows, pipeline))
    print(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
