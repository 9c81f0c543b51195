"""Pipeline overhead: the restore-archive flow against the same work done by pulse_core directly.

Two measurements, one per mode:

- default: N LR inputs (64) restored by the Prefect flow (`flows.restore.restore_archive`, threads
  runner, one worker thread, local folders) and by the same library calls in a plain loop:
  `discover`, `process_batch` on the same batches (`--inputs-per-task` inputs each), `finalize_run`.
  Both write the same PNGs, manifest parts, merged manifests and index, so the difference is
  what Prefect adds (task and flow runs, state changes, logs and artifacts sent to the API).
  Prefect's start-up (the temporary API, and the first flow call in the process) is timed on its
  own and excluded from the ratio. The model is loaded, and torch warmed up, before either path
  is timed; repeats alternate the order. Target: flow / direct <= 1.15 (min over repeats of
  each, the estimate least disturbed by other programs). Because searches on a shared machine
  vary a lot from run to run, the time spent inside `process_batch` is also measured in both
  paths: the time around it is what Prefect adds, and gives the ratio on equal work.
- `--memory`: `process_batch` over 1,000 inputs in one process (`--steps 5` by default, to be
  quick), sampling the resident set size (VmRSS) after each batch: first, last, max and the
  slope after warm-up, with a pass/fail line ("worker memory stays flat").

Inputs are the demo generator's own faces (random latents), downscaled with the bicubic forward
operator to 16x16: in range for the generator and all distinct.

    python bench/pipeline_overhead.py                       # 64 inputs, 100 steps, 3 repeats
    python bench/pipeline_overhead.py --memory              # 1,000 inputs, 5 steps
    python bench/pipeline_overhead.py --images 16 --steps 10 --repeats 1 --out results.json

Uses a temporary Prefect API (SQLite, PREFECT_HOME in a temp folder) unless PREFECT_API_URL is
set, in which case that server is used and start-up is not measured. SQLite serialises the
server's writes, so the flow's overhead is far higher there than against a server on Postgres:
    PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://... prefect server start --port 4300
    PREFECT_API_URL=http://127.0.0.1:4300/api python bench/pipeline_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python bench/pipeline_overhead.py` from a checkout

TARGET_RATIO = 1.15  # flow wall time / direct wall time
MEMORY_WARMUP = 0.1  # fraction of batches ignored before judging the slope
MEMORY_MAX_GROWTH_MIB = 32.0  # after warm-up, RSS may not grow by more than this over the run
LR_SIZE = 16  # 64 px generator, factor 4


# --------------------------------------------------------------------------------------------
# Inputs


def make_inputs(folder: Path, count: int, seed: int = 1234) -> list[str]:
    """`count` distinct 16x16 LR faces from the demo generator, as PNGs in `folder`."""
    import torch

    from pulse_core.downscale import downscale
    from pulse_core.generators.loading import load_generator
    from pulse_core.imaging import encode_png

    generator = load_generator("demo")
    factor = generator.resolution // LR_SIZE
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)
    names: list[str] = []
    with torch.no_grad():
        for start in range(0, count, 100):
            n = min(100, count - start)
            z = torch.randn(n, generator.num_latents, generator.latent_dim, generator=rng)
            hr = ((generator.synthesize(generator.prior(z), []) + 1) / 2).clamp(0, 1)
            lr = downscale(hr, factor, "bicubic").clamp(0, 1)
            for i in range(n):
                name = f"face-{start + i:05d}.png"
                (folder / name).write_bytes(encode_png(lr[i]))
                names.append(name)
    return names


def settings_for(args: argparse.Namespace) -> Any:
    from pulse_core.settings import build_settings

    return build_settings("reference", {"steps": args.steps}, model="demo", samples=args.samples)


# --------------------------------------------------------------------------------------------
# Overhead: flow vs direct


class WorkClock:
    """Wall time spent inside `process_batch`: the work both paths share, to the microsecond.

    The flow's task calls `tasks.restore.process_batch`; the bench swaps in a timed wrapper
    there (the threads runner runs tasks in this process) and uses the same wrapper in the
    direct loop. A run's wall time minus its work time is what surrounds the work: discovery,
    finalisation and, for the flow, everything Prefect does. Unlike a difference of two totals,
    that is hardly disturbed by other programs slowing the searches down.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - started

        return timed


def run_direct(
    source: Path,
    dest: Path,
    args: argparse.Namespace,
    run_id: str,
    work: Any,
    limit: int | None = None,
) -> dict:
    """The flow's work without Prefect: check, discover, restore the same batches, finalize.

    Batches run one at a time in a new single-thread pool, as the flow's threads runner with
    max_workers=1 runs them (a pool per run): the same work in the same kind of thread.
    """
    from pulse_core.pipeline import discover, finalize_run
    from pulse_core.storage import open_storage

    src, dst = open_storage(str(source)), open_storage(str(dest))
    src.check()
    dst.check(create=True)
    found = discover(src, dst, args.samples, limit=limit)
    settings = settings_for(args)
    size = args.inputs_per_task
    batches = [found.pending[i : i + size] for i in range(0, len(found.pending), size)]
    ok = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for n, keys in enumerate(batches):
            job = pool.submit(work, keys, src, dst, settings, run_id=run_id, batch_id=f"{n:05d}")
            ok += job.result().ok_count
    finalize_run(dst, run_id)
    return {"ok": ok, "batches": len(batches)}


def run_flow(source: Path, dest: Path, args: argparse.Namespace) -> dict:
    from flows.restore import restore_archive
    from pulse_core.settings import PipelineOptions

    summary = restore_archive(
        str(source),
        str(dest),
        settings=settings_for(args),  # the same fixed-length searches on both sides
        options=PipelineOptions(
            inputs_per_task=args.inputs_per_task, task_runner="threads", max_workers=1
        ),
    )
    return {"ok": summary.ok, "fan_out_seconds": summary.seconds}


def bench_overhead(args: argparse.Namespace, workdir: Path) -> dict:
    from contextlib import ExitStack

    from pulse_core.generators.loading import load_generator
    from pulse_core.pipeline import process_batch

    source = workdir / "source"
    t = time.perf_counter()
    make_inputs(source, args.images)
    print(f"made {args.images} inputs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    clock = WorkClock()
    timed_restore = clock.wrap(process_batch)

    with ExitStack() as stack:
        startup: dict[str, Any] = {}
        t = time.perf_counter()
        from prefect import flow  # importing Prefect is part of its start-up cost

        startup["import_seconds"] = time.perf_counter() - t
        if os.environ.get("PREFECT_API_URL"):
            startup["api"] = "external server (PREFECT_API_URL): start-up not measured"
        else:
            from prefect.testing.utilities import prefect_test_harness

            t = time.perf_counter()
            stack.enter_context(prefect_test_harness(server_startup_timeout=120))
            startup["api"] = "temporary API (SQLite)"
            startup["api_start_seconds"] = time.perf_counter() - t

        @flow(name="bench-warm-up")
        def warm_up() -> int:
            return 1

        t = time.perf_counter()
        warm_up()
        startup["first_flow_seconds"] = time.perf_counter() - t
        import tasks.restore

        # Same state for both paths: model in the per-process cache, torch kernels initialised
        # (one batch with the real settings).
        load_generator("demo")
        run_direct(
            source, workdir / "warm-up", args, "warm-up", process_batch, args.inputs_per_task
        )
        tasks.restore.process_batch = timed_restore  # the task now reports its work time too

        runs: list[dict] = []
        for rep in range(args.repeats):
            order = ("direct", "flow") if rep % 2 == 0 else ("flow", "direct")
            result: dict[str, Any] = {"repeat": rep}
            for kind in order:
                dest = workdir / f"{kind}-{rep}"
                clock.seconds = 0.0
                started = time.perf_counter()
                if kind == "direct":
                    out = run_direct(source, dest, args, f"direct-{rep}", timed_restore)
                else:
                    out = run_flow(source, dest, args)
                out["seconds"] = time.perf_counter() - started
                out["work_seconds"] = clock.seconds
                out["outside_seconds"] = out["seconds"] - out["work_seconds"]
                result[kind] = out
                shutil.rmtree(dest, ignore_errors=True)
                print(
                    f"repeat {rep} {kind:6s}: {out['seconds']:7.2f} s wall, of which "
                    f"{out['work_seconds']:7.2f} s in process_batch ({out['ok']} ok), "
                    f"load {os.getloadavg()[0]:.1f}",
                    file=sys.stderr,
                )
            result["ratio"] = result["flow"]["seconds"] / result["direct"]["seconds"]
            runs.append(result)
        tasks.restore.process_batch = process_batch

    def med(kind: str, what: str) -> float:
        return statistics.median(r[kind][what] for r in runs)

    direct = [r["direct"]["seconds"] for r in runs]
    flow_s = [r["flow"]["seconds"] for r in runs]
    ratio_min = min(flow_s) / min(direct)
    work = statistics.median(r[k]["work_seconds"] for r in runs for k in ("direct", "flow"))
    added = med("flow", "outside_seconds") - med("direct", "outside_seconds")
    batches = runs[0]["direct"]["batches"]
    return {
        "mode": "overhead",
        "images": args.images,
        "steps": args.steps,
        "samples": args.samples,
        "inputs_per_task": args.inputs_per_task,
        "batches": batches,
        "repeats": args.repeats,
        "startup": startup,
        "runs": runs,
        "direct_median_seconds": statistics.median(direct),
        "flow_median_seconds": statistics.median(flow_s),
        "direct_min_seconds": min(direct),
        "flow_min_seconds": min(flow_s),
        "ratio_min": ratio_min,
        "ratio_median": statistics.median(r["ratio"] for r in runs),  # of adjacent pairs
        "work_median_seconds": work,
        "direct_work_median_seconds": med("direct", "work_seconds"),
        "flow_work_median_seconds": med("flow", "work_seconds"),
        "direct_outside_median_seconds": med("direct", "outside_seconds"),
        "flow_outside_median_seconds": med("flow", "outside_seconds"),
        "prefect_added_seconds": added,
        "prefect_added_seconds_per_batch": added / max(batches, 1),
        "ratio_from_added": (work + med("flow", "outside_seconds"))
        / (work + med("direct", "outside_seconds")),
        "target_ratio": TARGET_RATIO,
        "passed": ratio_min <= TARGET_RATIO,
    }


# --------------------------------------------------------------------------------------------
# Memory: process_batch over many inputs in one process


def rss_mib() -> float:
    """This process's resident set size (VmRSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against their index (units of y per sample)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return num / den


def bench_memory(args: argparse.Namespace, work: Path) -> dict:
    from pulse_core.generators.loading import load_generator
    from pulse_core.pipeline import process_batch
    from pulse_core.storage import open_storage

    source, dest = work / "source", work / "dest"
    t = time.perf_counter()
    names = make_inputs(source, args.images)
    print(f"made {args.images} inputs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    load_generator("demo")
    src, dst = open_storage(str(source)), open_storage(str(dest))
    dst.check(create=True)
    settings = settings_for(args)
    size = args.inputs_per_task
    batches = [names[i : i + size] for i in range(0, len(names), size)]
    samples: list[float] = []
    started = time.perf_counter()
    ok = 0
    for n, keys in enumerate(batches):
        ok += process_batch(keys, src, dst, settings, run_id="memory", batch_id=f"{n:05d}").ok_count
        samples.append(rss_mib())
        if n % 25 == 0 or n == len(batches) - 1:
            print(
                f"batch {n + 1}/{len(batches)}: RSS {samples[-1]:.1f} MiB",
                file=sys.stderr,
            )
    seconds = time.perf_counter() - started
    skip = max(1, int(len(samples) * MEMORY_WARMUP))
    steady = samples[skip:]
    per_batch = slope(steady)
    per_1000_images = per_batch * 1000 / size
    growth = max(steady) - steady[0]
    passed = growth <= MEMORY_MAX_GROWTH_MIB and per_1000_images <= MEMORY_MAX_GROWTH_MIB
    return {
        "mode": "memory",
        "images": args.images,
        "ok": ok,
        "steps": args.steps,
        "samples": args.samples,
        "inputs_per_task": size,
        "seconds": seconds,
        "rss_mib": samples,
        "rss_first_mib": samples[0],
        "rss_last_mib": samples[-1],
        "rss_max_mib": max(samples),
        "warmup_batches": skip,
        "growth_after_warmup_mib": growth,
        "slope_mib_per_batch": per_batch,
        "slope_mib_per_1000_images": per_1000_images,
        "max_growth_mib": MEMORY_MAX_GROWTH_MIB,
        "passed": passed,
    }


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", action="store_true", help="memory mode (process_batch only)")
    p.add_argument("--images", type=int, help="inputs (default 64; --memory: 1000)")
    p.add_argument("--steps", type=int, help="search steps (default 100; --memory: 5)")
    p.add_argument("--samples", type=int, default=1, help="samples per input (default 1)")
    p.add_argument(
        "--inputs-per-task", type=int, default=8, help="inputs per restore task (default 8)"
    )
    p.add_argument("--repeats", type=int, default=3, help="overhead repeats (default 3)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 1000 if args.memory else 64
    if args.steps is None:
        args.steps = 5 if args.memory else 100

    work = Path(tempfile.mkdtemp(prefix="pulse-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        import torch

        started, load_before = time.perf_counter(), os.getloadavg()
        result = bench_memory(args, work) if args.memory else bench_overhead(args, work)
        result["total_seconds"] = time.perf_counter() - started
        result["load_average"] = {
            "start": round(load_before[0], 2),
            "end": round(os.getloadavg()[0], 2),
        }
        result["machine"] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["passed"] else 1


def print_report(r: dict) -> None:
    verdict = "PASS" if r["passed"] else "FAIL"
    if r["mode"] == "memory":
        print(
            f"memory: {r['images']} inputs x {r['samples']} sample(s), {r['steps']} steps, "
            f"{r['inputs_per_task']} per batch, {r['seconds']:.0f} s\n"
            f"  RSS first {r['rss_first_mib']:.1f} MiB, last {r['rss_last_mib']:.1f} MiB, "
            f"max {r['rss_max_mib']:.1f} MiB\n"
            f"  after {r['warmup_batches']} warm-up batches: growth {r['growth_after_warmup_mib']:.1f}"
            f" MiB, slope {r['slope_mib_per_1000_images']:+.2f} MiB per 1,000 inputs "
            f"(limit {r['max_growth_mib']:.0f} MiB)\n"
            f"{verdict}: worker memory {'stays flat' if r['passed'] else 'grows'} "
            f"over {r['images']} inputs"
        )
        return
    s = r["startup"]
    start = ", ".join(
        f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in s.items() if k.endswith("_seconds")
    )
    print(
        f"overhead: {r['images']} inputs x {r['samples']} sample(s), {r['steps']} steps, "
        f"{r['batches']} batches of {r['inputs_per_task']}, {r['repeats']} repeat(s)\n"
        f"  Prefect start-up (excluded): {start} [{s['api']}]\n"
        f"  direct (pulse_core loop): min {r['direct_min_seconds']:.2f} s, "
        f"median {r['direct_median_seconds']:.2f} s\n"
        f"  flow (threads runner):    min {r['flow_min_seconds']:.2f} s, "
        f"median {r['flow_median_seconds']:.2f} s\n"
        f"  inside process_batch (median): direct {r['direct_work_median_seconds']:.2f} s, "
        f"flow {r['flow_work_median_seconds']:.2f} s\n"
        f"  around it (median): direct {r['direct_outside_median_seconds']:.2f} s, flow "
        f"{r['flow_outside_median_seconds']:.2f} s: Prefect adds {r['prefect_added_seconds']:.2f}"
        f" s ({r['prefect_added_seconds_per_batch']:.2f} s per batch), ratio on equal work "
        f"{r['ratio_from_added']:.3f}\n"
        f"  load average: {r['load_average']}\n"
        f"{verdict}: flow / direct = {r['ratio_min']:.3f} (min/min wall time; median of adjacent "
        f"pairs {r['ratio_median']:.3f}), target <= {r['target_ratio']}"
    )


if __name__ == "__main__":
    sys.exit(main())
