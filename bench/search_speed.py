"""Search speed: milliseconds per optimiser step, per sample, and samples per second, by batch size.

Every measurement runs the real `pulse_core.search.search` with `SearchConfig.reference()` (only
`steps` changed) on random LR targets, so a step is exactly what a restore does: prior
transform, synthesis, bicubic downscale, loss, backward, Adam, projection, best-iterate
bookkeeping. Generators:

- `demo`: the demo DCGAN (64x64) from the model cache (LR 16x16). Not downloaded here: if it is
  missing the bench stops and says to run `pulse models pull demo`.
- `stylegan1-256`, `stylegan1-1024`: StyleGAN v1 synthesis with random weights and a Gaussian
  fit of mean 0, std 1 (LR 32x32). Same architecture and cost as the FFHQ model.
- `stylegan2-256`, `stylegan2-1024`: StyleGAN2 (NVIDIA ADA layout, config f: channel_base 32768,
  channel_max 512, skip architecture), random weights, all 17 (1024) noise inputs.
- `stylegan3-256`, `stylegan3-1024`: StyleGAN3-T with the release's 14 layers (channel_base 32768,
  channel_max 512), random weights; no noise inputs.

Per (generator, batch): `--warmup` steps in a first search (builds caches, warms the allocator),
then a second search whose per-step wall times (from the step callback) give the median and
min. samples/s = batch / (100 x median step): complete 100-step reference searches per second.

    python bench/search_speed.py                                  # everything: 1 min (2 cores), more if busy
    python bench/search_speed.py --quick                          # fewer steps, 1024 at batch 1 only
    python bench/search_speed.py --generators demo --batches 1,8 --json out.json
    python bench/search_speed.py --device cuda
    python bench/search_speed.py --generators demo --compile         # torch.compile (issue 13)
    python bench/search_speed.py --generators demo --channels-last   # channels-last weights
    python bench/search_speed.py --precision bf16 --checkpoint on    # any Execution

On a busy machine (more runnable threads than cores) OpenMP's default spin-waiting makes every
parallel region wait for a descheduled worker: measured here at load ~5 on 2 cores, StyleGAN v1
1024 went from 1.2 s/step with `OMP_WAIT_POLICY=PASSIVE` (or 1 thread) to 2.2-3.1 s/step with the
default. The machine line records those variables and the load average; every row its own load.

Targets checked (and printed): demo batch 8 gives >= 2x the samples/s of batch 1; StyleGAN v1
at 1024 takes < 2.0 s per step at batch 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python bench/search_speed.py` from a checkout

GENERATORS = (
    "demo",
    "stylegan1-256",
    "stylegan1-1024",
    "stylegan2-256",
    "stylegan2-1024",
    "stylegan3-256",
    "stylegan3-1024",
)
REFERENCE_STEPS = 100  # a full reference search, for samples/s
TARGET_DEMO_BATCH_GAIN = 2.0  # demo: samples/s at batch 8 / samples/s at batch 1
TARGET_STYLEGAN1024_S = 2.0  # StyleGAN v1 1024, batch 1: seconds per step

# (warm-up steps, timed steps) per generator; --quick uses the second table. Two warm-up steps:
# with the allocator tuning (pulse_core.search.keep_freed_memory) the heap reaches its
# high-water mark during the second step, after which steps no longer page-fault.
STEPS = {"demo": (3, 20), **{f"stylegan{v}-256": (2, 5) for v in (1, 2, 3)}}
STEPS.update({f"stylegan{v}-1024": (2, 3) for v in (1, 2, 3)})
QUICK_STEPS = {"demo": (2, 10), **{f"stylegan{v}-256": (2, 3) for v in (1, 2, 3)}}
QUICK_STEPS.update({f"stylegan{v}-1024": (2, 2) for v in (1, 2, 3)})
LR_SIZE = {"demo": 16, **{name: 32 for name in GENERATORS if name != "demo"}}


def machine_info(device: str) -> dict[str, Any]:
    import torch

    from pulse_core.search import keep_freed_memory

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "malloc_tuning": keep_freed_memory() if device == "cpu" else None,
        "env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PULSE_MALLOC_TUNING")
            if k in os.environ
        },
        "load_avg_start": _load_avg(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not on POSIX
        return -(10**12)


def build_generator(name: str, device: str):
    import torch

    from pulse_core.errors import ModelFileError
    from pulse_core.generators.loading import load_generator
    from pulse_core.generators.stylegan1 import StyleGAN1Generator, StyleGAN1Synthesis

    if name == "demo":
        try:
            return load_generator("demo", device)
        except ModelFileError as exc:
            sys.exit(
                f"search_speed: cannot load the demo generator: {exc}\n"
                "The bench never downloads: fetch it with `pulse models pull demo` (or `make model`)."
            )
    if name.startswith("stylegan1-"):
        res = int(name.split("-", 1)[1])
        torch.manual_seed(0)
        synthesis = StyleGAN1Synthesis(res)
        gen = StyleGAN1Generator(synthesis, torch.zeros(512), torch.ones(512))
        return gen.to(device).freeze()
    if name.startswith(("stylegan2-", "stylegan3-")):
        from pulse_core.generators.gaussian_fit import GaussianFit

        res = int(name.split("-", 1)[1])
        torch.manual_seed(0)
        fit = GaussianFit(torch.zeros(512), torch.ones(512))
        dims = {"z_dim": 512, "c_dim": 0, "w_dim": 512, "img_resolution": res, "img_channels": 3}
        dims["mapping_kwargs"] = {"num_layers": 8 if name.startswith("stylegan2") else 2}
        synthesis = {"channel_base": 32768, "channel_max": 512}
        if name.startswith("stylegan2-"):
            from pulse_core.generators.stylegan2 import StyleGAN2Generator

            gen = StyleGAN2Generator.from_init_kwargs({**dims, "synthesis_kwargs": synthesis})
            gen.set_gaussian_fit(fit)
        else:
            from pulse_core.generators.stylegan3 import StyleGAN3Generator

            kwargs = {**dims, **synthesis}
            mapping, synth = StyleGAN3Generator.build(kwargs)
            gen = StyleGAN3Generator(mapping, synth, fit, kwargs)
        return gen.to(device).freeze()
    raise SystemExit(
        f"search_speed: unknown generator {name!r}; choose from {', '.join(GENERATORS)}"
    )


def measure(
    gen,
    name: str,
    batch: int,
    device: str,
    warmup: int,
    timed: int,
    execution: Any = None,  # pulse_core.search.Execution; None = the default (fp32, plain)
) -> dict[str, Any]:
    import torch

    from pulse_core.search import SearchConfig, initial_state, search

    lr = LR_SIZE[name]
    g = torch.Generator().manual_seed(batch)
    targets = torch.rand(batch, 3, lr, lr, generator=g)
    config = SearchConfig.reference().with_(steps=timed)
    init = initial_state(gen, [1000 * batch + i for i in range(batch)], config)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    search(gen, targets, init, config.with_(steps=warmup), execution=execution)
    sync()
    stamps = [time.perf_counter()]

    def on_step(step: int, steps: int, converged: torch.Tensor) -> None:
        sync()
        stamps.append(time.perf_counter())

    cpu0, faults0 = time.process_time(), _minor_faults()
    out = search(gen, targets, init, config, on_step=on_step, execution=execution)
    cpu = time.process_time() - cpu0
    faults = _minor_faults() - faults0
    assert out.steps_run == timed
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    median = statistics.median(steps)
    return {
        "generator": name,
        "resolution": gen.resolution,
        "lr_size": lr,
        "batch": batch,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "step_ms_median": round(median * 1000, 1),
        "step_ms_min": round(min(steps) * 1000, 1),
        "step_ms_per_sample": round(median * 1000 / batch, 1),
        "cpu_ms_per_step": round(cpu * 1000 / timed, 1),
        "samples_per_s": round(batch / (REFERENCE_STEPS * median), 4),
        "minor_page_faults_per_step": faults // timed if faults >= 0 else None,
        "load_avg": _load_avg(),
    }


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = {(r["generator"], r["batch"]): r for r in rows}
    checks = []
    d1, d8 = found.get(("demo", 1)), found.get(("demo", 8))
    if d1 and d8:
        gain = d8["samples_per_s"] / d1["samples_per_s"]
        checks.append(
            {
                "target": f"demo: batch 8 samples/s >= {TARGET_DEMO_BATCH_GAIN:g}x batch 1",
                "value": round(gain, 2),
                "met": gain >= TARGET_DEMO_BATCH_GAIN,
            }
        )
    s1 = found.get(("stylegan1-1024", 1))
    if s1:
        sec = s1["step_ms_median"] / 1000
        checks.append(
            {
                "target": f"stylegan1-1024: < {TARGET_STYLEGAN1024_S:g} s per step at batch 1",
                "value": round(sec, 3),
                "met": sec < TARGET_STYLEGAN1024_S,
            }
        )
    return checks


def markdown(rows: list[dict[str, Any]]) -> str:
    base = {r["generator"]: r["samples_per_s"] for r in rows if r["batch"] == 1}
    lines = [
        "| generator | batch | ms/step (median) | ms/step (min) | ms/step/sample | samples/s "
        "(100-step searches) | vs batch 1 | load avg (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gain = r["samples_per_s"] / base[r["generator"]] if r["generator"] in base else None
        load = r["load_avg"][0] if r["load_avg"] else "-"
        lines.append(
            f"| {r['generator']} | {r['batch']} | {r['step_ms_median']:.1f} | {r['step_ms_min']:.1f}"
            f" | {r['step_ms_per_sample']:.1f} | {r['samples_per_s']:.4g} | "
            f"{f'{gain:.2f}x' if gain is not None else '-'} | {load} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", default=",".join(GENERATORS))
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps; stylegan1-1024 at batch 1 only"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--checkpoint", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the synthesis")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="weights in channels-last memory format (what a channels-last option would do)",
    )
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    names = [n.strip() for n in args.generators.split(",") if n.strip()]
    for n in names:
        if n not in GENERATORS:
            parser.error(f"unknown generator {n!r}; choose from {', '.join(GENERATORS)}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    info = machine_info(args.device)
    print(
        f"machine: {info['cpu']}, {info['usable_cores']} usable of {info['logical_cores']} cores, "
        f"torch {info['torch']} ({info['torch_threads']} threads), device {args.device}"
        + (f" ({info['gpu']})" if "gpu" in info else "")
        + f", malloc tuning {info['malloc_tuning']}, env {info['env'] or '-'}"
        + f", load avg {info['load_avg_start']}",
        flush=True,
    )
    from pulse_core.search import Execution

    execution = Execution(
        precision=args.precision, checkpoint=args.checkpoint, compile=args.compile
    )
    info["execution"] = {**execution.__dict__, "channels_last": args.channels_last}
    rows = []
    for name in names:
        gen = build_generator(name, args.device)
        if args.channels_last:
            gen = gen.to(memory_format=torch.channels_last)
        warmup, timed = (QUICK_STEPS if args.quick else STEPS)[name]
        for batch in batches:
            if args.quick and name.endswith("-1024") and batch != 1:
                continue
            row = measure(gen, name, batch, args.device, warmup, timed, execution)
            rows.append(row)
            print(
                f"  {name:15s} batch {batch}: {row['step_ms_median']:9.1f} ms/step "
                f"({row['step_ms_per_sample']:.1f} ms/step/sample, {row['samples_per_s']:.4g} "
                f"samples/s, {timed} timed steps, {row['minor_page_faults_per_step']} page "
                "faults/step)",
                flush=True,
            )
        del gen
    checks = check_targets(rows)
    info["load_avg_end"] = _load_avg()
    print()
    print(markdown(rows))
    print()
    for c in checks:
        print(f"{'MET ' if c['met'] else 'MISS'}  {c['target']}: {c['value']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": info, "command": [sys.executable, *sys.argv], "results": rows}
        payload["targets"] = checks
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
