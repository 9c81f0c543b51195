"""NVIDIA network pickles: written here the way `torch_utils.persistence` writes them, read back
without running any of their code, and searched with PULSE.

The writer below reproduces the layout of a StyleGAN2-ADA snapshot (`pickle.dump` of
{'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'}): every network is a
`torch_utils.persistence._reconstruct_persistent_obj(meta)` call whose `meta` carries the module
source, the bare class name, version 6 and the module's `__dict__`; tensors go through torch's
own pickling (parameters via `_rebuild_parameter`, storages via `_load_from_bytes`); option dicts
are `dnnlib.util.EasyDict`s and attributes include numpy scalars and arrays. Stand-in modules
named `torch_utils.persistence` and `dnnlib.util` exist only while writing, so the pickle refers
to NVIDIA's names without NVIDIA's code.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pulse_core.errors import ModelFileError
from pulse_core.generators.gaussian_fit import FIT_SAMPLES, FIT_SEED, load_gaussian_fit
from pulse_core.generators.loading import load_generator_file, sha256_of
from pulse_core.generators.nvidia_pickle import (
    PersistentObject,
    load_network_pickle,
    looks_like_network_pickle,
    module_tensors,
    read_network_pickle,
)
from pulse_core.generators.stylegan2 import StyleGAN2Generator, fit_cache_path
from tests.test_stylegan2 import pulse_recovers_own_sample, tiny_init_kwargs, tiny_stylegan2

NETWORKS_SRC = '"""Network architectures from the paper\n"Analyzing and Improving the Image Quality of StyleGAN"."""\n'

# ----------------------------------------------------------------------------
# Writing NVIDIA-style pickles


@contextlib.contextmanager
def nvidia_names() -> Iterator[types.SimpleNamespace]:
    """Temporarily make `torch_utils.persistence` and `dnnlib.util` importable stand-ins."""

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called by these tests
        raise AssertionError("the loader must not call NVIDIA's reconstruct function")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    easy_dict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    modules = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": types.ModuleType("dnnlib.util"),
    }
    modules["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    modules["dnnlib.util"].EasyDict = easy_dict
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=easy_dict)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


class Persistent:
    """Pickles like a `torch_utils.persistence` instance of `module` (recursively)."""

    def __init__(
        self, names, module: nn.Module, class_name: str, init_kwargs=None, src=NETWORKS_SRC
    ):
        self.names, self.module, self.class_name = names, module, class_name
        self.init_kwargs, self.src = init_kwargs or {}, src

    def __reduce__(self):
        m = self.module
        state = {
            "training": False,
            "_parameters": OrderedDict(m._parameters),
            "_buffers": OrderedDict(m._buffers),
            "_non_persistent_buffers_set": set(),
            "_backward_hooks": OrderedDict(),
            "_forward_hooks": OrderedDict(),
            "_forward_pre_hooks": OrderedDict(),
            "_state_dict_hooks": OrderedDict(),
            "_load_state_dict_pre_hooks": OrderedDict(),
            "_modules": OrderedDict(
                (name, self._wrap(child)) for name, child in m._modules.items()
            ),
            "_init_args": (),
            "_init_kwargs": to_easy(self.names, self.init_kwargs),
            # plain attributes as NVIDIA's modules hold them (numpy values included)
            "weight_gain": np.float64(0.125),
            "in_size": np.broadcast_to(np.asarray([4, 4]), [2]),
            "activation": "lrelu",
        }
        meta = {
            "type": "class",
            "version": 6,
            "module_src": self.src,
            "class_name": self.class_name,
            "state": state,
        }
        return (self.names.reconstruct, (meta,))

    def _wrap(self, child: nn.Module):
        if isinstance(child, nn.Linear):  # a plain torch module, pickled as torch pickles it
            return child
        return Persistent(self.names, child, type(child).__name__, src=self.src)


def to_easy(names, value):
    if isinstance(value, dict):
        return names.EasyDict({k: to_easy(names, v) for k, v in value.items()})
    return value


def write_network_pickle(
    path: Path,
    gen: nn.Module,
    init_kwargs: dict,
    *,
    src: str = NETWORKS_SRC,
    flatten_synthesis_kwargs: bool = False,
) -> Path:
    """A StyleGAN2-ADA-style snapshot of `gen` (its `mapping`/`synthesis` tree) at `path`."""
    if flatten_synthesis_kwargs:  # the stylegan3 repository's networks_stylegan2 layout
        init_kwargs = dict(init_kwargs)
        init_kwargs.update(init_kwargs.pop("synthesis_kwargs"))
    tree = nn.Module()
    tree.synthesis = gen.synthesis  # NVIDIA builds synthesis first
    tree.mapping = gen.mapping
    discriminator = nn.Module()
    discriminator.b4 = nn.Linear(3, 2)  # a plain torch module inside: kept as an inert record
    with nvidia_names() as names:
        snapshot = {
            "G": Persistent(names, tree, "Generator", init_kwargs, src),
            "D": Persistent(names, discriminator, "Discriminator", {"c_dim": 0}, src),
            "G_ema": Persistent(names, tree, "Generator", init_kwargs, src),
            "augment_pipe": None,
            "training_set_kwargs": names.EasyDict(path="~/ffhq.zip", resolution=16, xflip=True),
        }
        with path.open("wb") as f:
            pickle.dump(snapshot, f)
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PULSE_CACHE", str(root))
    return root


# ----------------------------------------------------------------------------
# Reading


def test_pickle_is_read_as_data_and_g_ema_keys_map_fully(tmp_path: Path):
    gen = tiny_stylegan2(16)
    path = write_network_pickle(tmp_path / "net.pkl", gen, tiny_init_kwargs(16))
    data = read_network_pickle(path)
    assert isinstance(data["G_ema"], PersistentObject)
    assert data["G_ema"].class_name == "Generator" and data["G_ema"].version == 6
    tensors = module_tensors(data["G_ema"])
    assert set(tensors) == set(gen.state_dict())
    assert all(torch.equal(tensors[k], v) for k, v in gen.state_dict().items())
    assert data["training_set_kwargs"]["resolution"] == 16


@pytest.mark.parametrize("flatten", [False, True])
def test_loaded_network_equals_the_pickled_one(tmp_path: Path, flatten: bool):
    gen = tiny_stylegan2(16, seed=4)
    path = write_network_pickle(
        tmp_path / "net.pkl", gen, tiny_init_kwargs(16), flatten_synthesis_kwargs=flatten
    )
    loaded = load_network_pickle(path, fit_samples=200, use_fit_cache=False)
    assert isinstance(loaded, StyleGAN2Generator)
    ws = torch.randn(2, gen.num_latents, gen.latent_dim)
    noise = [torch.randn(2, 1, h, w) for h, w in gen.noise_shapes]
    with torch.no_grad():
        assert torch.equal(loaded.synthesize(ws, noise), gen.synthesize(ws, noise))
    assert loaded.has_gaussian_fit


def test_conv_clamp_and_architecture_come_from_the_init_kwargs(tmp_path: Path):
    gen = tiny_stylegan2(8, architecture="resnet", conv_clamp=0.5)
    kwargs = tiny_init_kwargs(8, architecture="resnet", conv_clamp=0.5)
    path = write_network_pickle(tmp_path / "net.pkl", gen, kwargs)
    loaded = load_network_pickle(path, fit_samples=100, use_fit_cache=False)
    assert loaded.synthesis.b8.architecture == "resnet"
    assert loaded.synthesis.b8.conv1.conv_clamp == 0.5
    ws = torch.randn(1, gen.num_latents, gen.latent_dim)
    with torch.no_grad():
        assert torch.equal(
            loaded.synthesize(ws, loaded.const_noise()), gen.synthesize(ws, gen.const_noise())
        )


def test_a_pickle_missing_a_tensor_is_refused_with_its_name(tmp_path: Path):
    gen = tiny_stylegan2(8)
    del gen.synthesis.b8.conv0._buffers["noise_const"]
    path = write_network_pickle(tmp_path / "net.pkl", gen, tiny_init_kwargs(8))
    with pytest.raises(ModelFileError, match=r"missing 1 .*b8\.conv0\.noise_const"):
        load_network_pickle(path, fit_samples=100, use_fit_cache=False)


def test_a_pickle_with_an_extra_tensor_is_refused_with_its_name(tmp_path: Path):
    gen = tiny_stylegan2(8)
    gen.synthesis.b8.register_buffer("surprise", torch.zeros(2))
    path = write_network_pickle(tmp_path / "net.pkl", gen, tiny_init_kwargs(8))
    with pytest.raises(ModelFileError, match=r"unexpected 1 .*b8\.surprise"):
        load_network_pickle(path, fit_samples=100, use_fit_cache=False)


def test_conditional_network_pickles_are_refused(tmp_path: Path):
    gen = tiny_stylegan2(8)
    path = write_network_pickle(tmp_path / "net.pkl", gen, {**tiny_init_kwargs(8), "c_dim": 10})
    with pytest.raises(ModelFileError, match="class-conditional"):
        load_network_pickle(path, use_fit_cache=False)


def test_stylegan3_pickles_go_to_the_stylegan3_builder(tmp_path: Path, monkeypatch):
    gen = tiny_stylegan2(8)
    tree = nn.Module()
    tree.synthesis = nn.Module()
    tree.synthesis.input = nn.Linear(2, 2)
    tree.synthesis.L0_36_512 = nn.Linear(2, 2)
    tree.mapping = gen.mapping
    seen = {}

    class FakeStyleGAN3:
        @staticmethod
        def from_init_kwargs(init_kwargs, state_dict, *, fit=None, fit_samples=None):
            seen.update(kwargs=init_kwargs, keys=set(state_dict), fit=fit, samples=fit_samples)
            return gen

    fake = types.ModuleType("pulse_core.generators.stylegan3")
    fake.StyleGAN3Generator = FakeStyleGAN3
    monkeypatch.setitem(sys.modules, "pulse_core.generators.stylegan3", fake)
    with nvidia_names() as names:
        data = {"G_ema": Persistent(names, tree, "Generator", {"z_dim": 12, "conv_kernel": 1})}
        (tmp_path / "sg3.pkl").write_bytes(pickle.dumps(data))
    assert load_network_pickle(tmp_path / "sg3.pkl", fit_samples=100, use_fit_cache=False) is gen
    assert seen["kwargs"] == {"z_dim": 12, "conv_kernel": 1}
    assert seen["fit"] is None and seen["samples"] == 100
    assert "synthesis.input.weight" in seen["keys"] and "mapping.fc0.weight" in seen["keys"]


def test_file_sniffing_tells_network_pickles_from_torch_files(tmp_path: Path):
    path = write_network_pickle(tmp_path / "net.pkl", tiny_stylegan2(8), tiny_init_kwargs(8))
    assert looks_like_network_pickle(path)
    torch.save({"a": torch.zeros(1)}, tmp_path / "zip.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert not looks_like_network_pickle(tmp_path / "zip.pt")
    assert not looks_like_network_pickle(tmp_path / "legacy.pt")


def test_load_generator_file_recognises_a_network_pickle(tmp_path: Path, cache: Path):
    gen = tiny_stylegan2(8)
    path = write_network_pickle(tmp_path / "ffhq-tiny.pkl", gen, tiny_init_kwargs(8))
    loaded = load_generator_file(path)
    assert isinstance(loaded, StyleGAN2Generator)
    assert loaded.model_id == "ffhq-tiny" and loaded.checksum == sha256_of(path)
    assert loaded.has_gaussian_fit
    cached = fit_cache_path(loaded.checksum, FIT_SAMPLES, FIT_SEED)
    assert cached.is_file()  # computed once, kept by the file's checksum
    assert torch.equal(load_gaussian_fit(cached).mean, loaded.fit_mean)


# ----------------------------------------------------------------------------
# Nothing from the file is executed


class _Calls:
    """Pickles as a call of `func(*args)` (what a malicious pickle does)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: _Calls(os.system, f"touch {marker}"),
        lambda marker: _Calls(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        lambda marker: _Calls(subprocess.Popen, ["touch", str(marker)]),
        lambda marker: _Calls(builtins.eval, f"open({str(marker)!r}, 'w')"),
    ],
    ids=["os.system", "builtins.exec", "subprocess.Popen", "builtins.eval"],
)
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": payload(marker)}))
    with pytest.raises(ModelFileError, match=r"refusing to load .*not a known network component"):
        load_network_pickle(path, use_fit_cache=False)
    assert not marker.exists()


def test_module_source_in_the_pickle_is_never_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('ran')\n"
    gen = tiny_stylegan2(8)
    path = write_network_pickle(tmp_path / "net.pkl", gen, tiny_init_kwargs(8), src=src)
    loaded = load_network_pickle(path, fit_samples=100, use_fit_cache=False)
    assert isinstance(loaded, StyleGAN2Generator)
    assert not marker.exists()


def test_a_storage_carrying_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    torch.save(_Calls(os.system, f"touch {marker}"), inner, _use_new_zipfile_serialization=False)
    evil_storage = _Calls(torch.storage._load_from_bytes, inner.getvalue())
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": evil_storage}))
    with pytest.raises(ModelFileError, match="refusing a tensor storage"):
        load_network_pickle(path, use_fit_cache=False)
    assert not marker.exists()


def test_tensorflow_pickles_get_a_conversion_hint(tmp_path: Path):
    network = type("Network", (), {"__module__": "dnnlib.tflib.network"})
    tflib = types.ModuleType("dnnlib.tflib.network")
    tflib.Network = network
    with nvidia_names():
        sys.modules["dnnlib.tflib"] = types.ModuleType("dnnlib.tflib")
        sys.modules["dnnlib.tflib.network"] = tflib
        try:
            blob = pickle.dumps((network(), network(), network()))
        finally:
            sys.modules.pop("dnnlib.tflib.network")
            sys.modules.pop("dnnlib.tflib")
    (tmp_path / "tf.pkl").write_bytes(blob)
    with pytest.raises(ModelFileError, match=r"TensorFlow .*legacy\.py"):
        load_network_pickle(tmp_path / "tf.pkl", use_fit_cache=False)


def test_a_truncated_pickle_is_a_model_file_error(tmp_path: Path):
    path = write_network_pickle(tmp_path / "net.pkl", tiny_stylegan2(8), tiny_init_kwargs(8))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ModelFileError, match=r"cannot read network pickle .*Re-download"):
        load_network_pickle(path, use_fit_cache=False)


# ----------------------------------------------------------------------------
# PULSE


def test_pulse_finds_a_sample_of_a_pickled_network_within_eps(tmp_path: Path):
    path = write_network_pickle(
        tmp_path / "net.pkl", tiny_stylegan2(16, seed=2), tiny_init_kwargs(16)
    )
    gen = load_network_pickle(path, fit_samples=5000, use_fit_cache=False).freeze()
    out = pulse_recovers_own_sample(gen)
    assert float(out.mse[0]) <= 2e-4


def test_a_stylegan3_network_pickle_loads_into_the_stylegan3_module(tmp_path: Path):
    stylegan3 = pytest.importorskip("pulse_core.generators.stylegan3")
    gen = stylegan3.StyleGAN3Generator.random(resolution=16, seed=1, fit_samples=500)
    path = write_network_pickle(tmp_path / "sg3.pkl", gen, dict(gen.init_kwargs))
    loaded = load_network_pickle(path, fit_samples=500, use_fit_cache=False)
    assert isinstance(loaded, stylegan3.StyleGAN3Generator)
    assert loaded.noise_shapes == ()
    ws = torch.randn(2, gen.num_latents, gen.latent_dim)
    with torch.no_grad():
        assert torch.equal(loaded.synthesize(ws, []), gen.synthesize(ws, []))


def test_catalogue_lists_nvidias_releases_with_pinned_checksums():
    from pulse_core.generators.catalogue import get_entry, list_models

    entries = {e.name: e for e in list_models() if e.family in ("stylegan2", "stylegan3")}
    for name in (
        "ffhq-1024-stylegan2-ada",
        "metfaces-1024-stylegan2-ada",
        "afhqcat-512-stylegan2-ada",
        "ffhq-1024-stylegan3-t",
        "ffhq-1024-stylegan3-r",
        "afhqv2-512-stylegan3-t",
        "metfaces-1024-stylegan3-r",
    ):
        assert name in entries
    for entry in entries.values():
        file = entry.main_file
        assert file.url is not None and file.url.startswith("https://")
        assert file.filename.endswith(".pkl") and file.sha256 is None  # none published
        assert "pinned" in entry.notes and "non-commercial" in entry.licence
        assert f"-{entry.resolution}-" in entry.name
    assert get_entry("ffhq-1024-stylegan2-ada").main_file.url == (
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl"
    )
