"""The memory estimate, the automatic search batch, the out-of-memory retry and their record."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pulse_core.generators.base import FeatureEdit, Generator
from pulse_core.manifest import (
    SAMPLES_SCHEMA,
    InputRecord,
    RowContext,
    part_key,
    read_index,
    sample_rows,
    samples_table,
    write_parquet,
)
from pulse_core.memory import is_out_of_memory, plan_batch, profile_step
from pulse_core.restore import restore_many
from pulse_core.search import Execution, SearchConfig
from pulse_core.storage import LocalStorage
from tests.helpers import tiny_stylegan1

REPO = Path(__file__).resolve().parent.parent
CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"


class OutOfMemoryAbove(Generator):
    """Another generator, except that a forward pass of more than `limit` rows fails like a
    CPU allocation that found no memory (per-call: nothing is set on the wrapped network)."""

    def __init__(self, inner: Generator, limit: int, message: str = CPU_OOM) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.message = message
        self.model_id = inner.model_id

    @property
    def resolution(self) -> int:
        return self.inner.resolution

    @property
    def num_latents(self) -> int:
        return self.inner.num_latents

    @property
    def latent_dim(self) -> int:
        return self.inner.latent_dim

    @property
    def noise_shapes(self) -> tuple[tuple[int, int], ...]:
        return self.inner.noise_shapes

    def prior(self, latent: torch.Tensor) -> torch.Tensor:
        return self.inner.prior(latent)

    def synthesize(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        if w.shape[0] > self.limit:
            raise RuntimeError(f"{self.message} (wanted {w.shape[0]} rows)")
        return self.inner.synthesize(w, noise, edit)


CONFIG = SearchConfig.reference().with_(steps=3)
IMAGES = [torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
KEYS = ["a", "b", "c"]


def _restore(gen: Generator, search_batch: int | None):
    return restore_many(IMAGES, gen, 2, keys=KEYS, config=CONFIG, search_batch=search_batch)


def test_an_out_of_memory_search_is_retried_at_half_the_batch():
    inner = tiny_stylegan1(16)
    halved = _restore(OutOfMemoryAbove(inner, limit=3), search_batch=6)  # 6 rows: 6 -> 3
    direct = _restore(inner, search_batch=3)
    for got, want in zip(halved, direct, strict=True):
        assert [s.search_batch for s in got.samples] == [3, 3]
        for s, t in zip(got.samples, want.samples, strict=True):
            assert torch.equal(s.hr, t.hr) and s.mse == t.mse and s.seed == t.seed


def test_halving_goes_down_to_one_row_and_keeps_the_smaller_batch():
    inner = tiny_stylegan1(16)
    out = _restore(OutOfMemoryAbove(inner, limit=1), search_batch=6)  # 6 -> 3 -> 1
    assert {s.search_batch for r in out for s in r.samples} == {1}


def test_out_of_memory_at_one_row_and_other_errors_are_not_retried():
    inner = tiny_stylegan1(16)
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        _restore(OutOfMemoryAbove(inner, limit=0), search_batch=2)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _restore(OutOfMemoryAbove(inner, limit=1, message="shape mismatch"), search_batch=2)


class PlainPathOutOfMemory(OutOfMemoryAbove):
    """Runs only checkpointed: the plain synthesis always fails like an allocation."""

    supports_checkpoint = True

    def synthesize_checkpointed(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        return self.inner.synthesize_checkpointed(w, noise, edit)


def test_a_single_row_that_does_not_fit_is_retried_with_checkpointing():
    inner = tiny_stylegan1(16)
    gen = PlainPathOutOfMemory(inner, limit=0)
    out = restore_many(
        IMAGES[:1],
        gen,
        1,
        keys=["a"],
        config=CONFIG,
        search_batch=1,
        execution=Execution(checkpoint="off"),
    )
    [sample] = out[0].samples
    assert sample.checkpoint and sample.search_batch == 1
    want = restore_many(IMAGES[:1], inner, 1, keys=["a"], config=CONFIG, search_batch=1)
    assert torch.equal(sample.hr, want[0].samples[0].hr)


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        (RuntimeError(CPU_OOM), True),
        (RuntimeError("[alloc_cpu] not enough memory: you tried to allocate 9 GB"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_errors_are_recognised(error: BaseException, oom: bool):
    assert is_out_of_memory(error) is oom


def test_the_auto_batch_is_what_the_budget_holds():
    gen = tiny_stylegan1(16)
    profile = profile_step(gen)
    row = profile.per_row(False)
    assert plan_batch(gen, 100, budget=profile.fixed + 5 * row + row // 2).batch == 5
    assert plan_batch(gen, 3, budget=profile.fixed + 5 * row).batch == 3  # never more than rows
    assert plan_batch(gen, 100, budget=0).batch == 1  # always try one row
    assert plan_batch(gen, 100, budget=1 << 50).batch == 32  # the CPU cap
    assert plan_batch(gen, 100, batch=7, checkpoint="off").batch == 7  # the user's choice


def test_bf16_halves_the_estimated_activations():
    gen = tiny_stylegan1(16)
    fp32, bf16 = profile_step(gen, "fp32"), profile_step(gen, "bf16")
    assert bf16.saved < 0.75 * fp32.saved


_MEASURE = """
import json, sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from bench.gpu_suite import build_generator
from pulse_core.memory import profile_step
from pulse_core.search import Execution, SearchConfig, initial_state, search
gen = build_generator({family!r}, {res}, "cpu")
config = SearchConfig.reference().with_(steps=1)
for _ in range(2):
    t = torch.rand({batch}, 3, {res} // 4, {res} // 4)
    search(gen, t, initial_state(gen, list(range({batch})), config), config,
           execution=Execution(checkpoint={ckpt!r}))
status = open("/proc/self/status").read().split("VmHWM:", 1)[1]
peak = int(status.split()[0]) * 1024  # this process image's own peak (kB)
print(json.dumps({{"peak": peak, "row": profile_step(gen).per_row({ckpt!r} == "on")}}))
"""


def _peak(ckpt: str, batch: int) -> dict[str, int]:
    code = _MEASURE.format(repo=str(REPO), family="stylegan2", res=64, ckpt=ckpt, batch=batch)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("ckpt", ["off", "on"])
def test_the_estimate_is_within_a_factor_2_5_of_the_measured_peak(ckpt):
    """Peak RSS of real CPU steps at batch 4 minus batch 1, each in a fresh process, vs 3 rows.

    Two processes rather than one growing one: a process's peak can come from its first steps
    (lazy initialisation, allocator slack). The peak is VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss across exec, so a child of a large process (pytest in the full suite)
    starts with its parent's peak and the growth disappears under it.
    Generous: RSS includes allocator slack, and the checkpointed estimate is on the safe side
    (StyleGAN2 64 px, release channels: 0.23 GB per row plain, 0.14 GB checkpointed).
    """
    one, four = _peak(ckpt, 1), _peak(ckpt, 4)
    measured = four["peak"] - one["peak"]
    estimated = 3 * four["row"]
    assert estimated / 2.5 <= measured <= estimated * 2.5, (measured, estimated)


# ----------------------------------------------------------------------------
# The manifest records how each sample was searched (schema version 4)


def _rows(search_batch: int) -> list[dict]:
    gen = tiny_stylegan1(16)
    result = restore_many(IMAGES[:1], gen, 2, keys=["a"], config=CONFIG, search_batch=search_batch)
    ctx = RowContext("run-1", gen.model_id, "", CONFIG.eps, "cpu", datetime.now(UTC))
    record = InputRecord("a.png", "sum", 4, 4, "center-crop", None, ())
    return sample_rows(ctx, record, result[0].attempts, {})


def test_the_manifest_records_batch_precision_and_checkpointing():
    table = samples_table(_rows(search_batch=1))
    assert table.column("search_batch").to_pylist() == [1, 1]
    assert table.column("precision").to_pylist() == ["fp32", "fp32"]
    assert table.column("checkpoint").to_pylist() == [False, False]


def test_version_3_index_parts_read_with_null_search_columns(tmp_path: Path):
    dest = LocalStorage(tmp_path)
    table = samples_table(_rows(search_batch=2))
    old = table.drop_columns(["search_batch", "precision", "checkpoint"])
    old = old.set_column(0, old.schema.field(0), pa.array([3] * old.num_rows, pa.int32()))
    old = old.replace_schema_metadata({b"pulse.schema": b"samples", b"pulse.schema_version": b"3"})
    write_parquet(dest, part_key("old"), old)
    got = read_index(dest)
    assert got.schema.equals(SAMPLES_SCHEMA)
    assert set(got.column("search_batch").to_pylist()) == {None}
    assert set(got.column("checkpoint").to_pylist()) == {None}
