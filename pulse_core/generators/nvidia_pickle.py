"""NVIDIA network pickles (StyleGAN2-ADA / StyleGAN3 `.pkl`) read without running their code.

What such a file is: `pickle.dump` of a dict `{'G', 'D', 'G_ema', 'augment_pipe',
'training_set_kwargs'}`. The networks are `torch_utils.persistence` objects: each pickles as a
call `torch_utils.persistence._reconstruct_persistent_obj(meta)` where `meta` holds the Python
source of the module that defined the class (`module_src`), its bare `class_name` (e.g.
'Generator'), a format `version` and the instance's `state` (its `__dict__`: `_parameters`,
`_buffers`, `_modules` with the sub-networks, `_init_args`, `_init_kwargs`, plain attributes).
NVIDIA's loader `exec`s `module_src` to rebuild the classes: loading a pickle runs whatever code
it carries. Tensors are pickled the way torch pickles them outside `torch.save`:
`torch._utils._rebuild_parameter` / `_rebuild_tensor_v2` over storages reduced to
`torch.storage._load_from_bytes(<legacy torch.save bytes>)`; attributes may hold numpy scalars
and arrays, and option dicts are `dnnlib.util.EasyDict`s.

This module unpickles with an explicit allow-list of globals: `_reconstruct_persistent_obj` is
replaced by a stub that records `meta` as data (the source is never executed or compiled),
storages are read by `torch.load(weights_only=True)` (torch's own restricted unpickler), EasyDict
becomes a plain dict, numpy scalars and arrays are rebuilt by numpy's own data constructors, and
plain `torch.nn` modules become inert records. Any other global (`os.system`, `builtins.exec`,
`subprocess.Popen`, an unknown class ...) stops the load with a ModelFileError before anything
is called. Classes handed to the pickle are fresh per load, so a pickle cannot alter them for the
next one. The generator is then rebuilt from `G_ema`'s
init kwargs and the tensors gathered from its module tree, with a strict coverage check.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pulse_core.errors import ModelFileError
from pulse_core.generators.base import Generator
from pulse_core.generators.gaussian_fit import FIT_SAMPLES, FIT_SEED, GaussianFit
from pulse_core.generators.stylegan2 import (
    StyleGAN2Generator,
    ensure_gaussian_fit,
    load_cached_fit,
    store_cached_fit,
)

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of the released pickles


# ----------------------------------------------------------------------------
# Inert stand-ins for the objects a network pickle contains.


@dataclass
class PersistentObject:
    """A `torch_utils.persistence` object as data: what NVIDIA's loader would have built."""

    class_name: str  # bare class name in its module ('Generator', 'SynthesisLayer', ...)
    module_src: str  # the module's Python source; kept as text, never executed
    version: int  # torch_utils.persistence format version
    state: dict[str, Any] = field(default_factory=dict)  # the instance __dict__

    @property
    def docstring(self) -> str:
        """The first line of the module's docstring, found textually (for messages)."""
        for quote in ('"""', "'''"):
            start = self.module_src.find(quote)
            if start >= 0:
                end = self.module_src.find(quote, start + 3)
                if end > start:
                    text = self.module_src[start + 3 : end].strip()
                    return text.splitlines()[0] if text else ""
        return ""


class TorchModuleRecord:
    """A plain `torch.nn` module found inside a pickle, kept as its class name and state."""

    qualname = "torch.nn.Module"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = state[0]
        if not isinstance(state, dict):
            raise ModelFileError(f"unexpected state for {self.qualname} in a network pickle")
        self.state = dict(state)


def _torch_module_record(module: str, name: str) -> type[TorchModuleRecord]:
    return type(name, (TorchModuleRecord,), {"qualname": f"{module}.{name}"})


class _EasyDict(dict):
    """`dnnlib.util.EasyDict` as a plain dict (attribute access is not needed here)."""

    def __setstate__(self, state: Any) -> None:  # an EasyDict's __dict__ is always empty
        if state:
            self.update(dict(state))


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    """Stub of `torch_utils.persistence._reconstruct_persistent_obj`: records, never executes."""
    if not isinstance(meta, dict):
        raise ModelFileError("malformed persistent object in network pickle (meta is not a dict)")
    if meta.get("type") != "class":
        raise ModelFileError(f"unsupported persistent object type {meta.get('type')!r}")
    state = meta.get("state")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise ModelFileError("malformed persistent object in network pickle (state)")
    return PersistentObject(
        class_name=str(meta.get("class_name", "")),
        module_src=str(meta.get("module_src", "")),
        version=int(meta.get("version", -1)),
        state=dict(state),
    )


def _load_storage(data: bytes) -> Any:
    """`torch.storage._load_from_bytes` with torch's restricted (weights-only) unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise ModelFileError("malformed tensor storage in network pickle")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"refusing a tensor storage of the network pickle: {exc}") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise ModelFileError("a tensor storage of the network pickle holds something else")
    return storage


def _rebuild_tensor_v2(
    storage: Any,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise ModelFileError("malformed tensor in network pickle (no storage)")
    if backward_hooks:
        raise ModelFileError("refusing a tensor with backward hooks in a network pickle")
    if metadata is not None and not isinstance(metadata, dict):
        raise ModelFileError("malformed tensor metadata in network pickle")
    return torch._utils._rebuild_tensor_v2(
        storage, int(offset), tuple(size), tuple(stride), False, collections.OrderedDict(), metadata
    )


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any) -> torch.Tensor:
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None) -> Any:
    if not isinstance(data, torch.Tensor):
        raise ModelFileError("malformed parameter in network pickle")
    if backward_hooks:
        raise ModelFileError("refusing a parameter with backward hooks in a network pickle")
    return data.detach()


def _rebuild_parameter_with_state(
    data: Any, requires_grad: bool, backward_hooks: Any, state: Any
) -> Any:
    return _rebuild_parameter(data, requires_grad, backward_hooks)


class _TensorType:
    """Stand-in for `torch.Tensor` / `torch.nn.Parameter` passed as a type argument."""


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter) or (
        new_type is not _TensorType
    ):
        raise ModelFileError("refusing a tensor subclass in a network pickle")
    return func(*args)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor` (protocol 0/1 objects), only for our inert stand-ins."""
    if isinstance(cls, type) and issubclass(cls, _EasyDict) and base is dict:
        return cls(state or {})
    if isinstance(cls, type) and issubclass(cls, TorchModuleRecord) and base is object:
        return cls.__new__(cls)
    raise ModelFileError("refusing an object reconstruction in a network pickle")


def _numpy_multiarray() -> Any:
    try:  # numpy >= 2 names it numpy._core; pickles written with numpy 1.x say numpy.core
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _numpy_global(module: str, name: str) -> Any:
    """numpy's data constructors (no user code runs through them); None if not allowed."""
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
        "scalar",
        "_reconstruct",
    ):
        return getattr(_numpy_multiarray(), name)
    if module == "numpy" and name in ("dtype", "ndarray"):
        return getattr(np, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(getattr(np, "dtypes", None), name, None)
    return None


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch", "Size"): tuple,
    ("torch", "device"): torch.device,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.easy_dict = type("EasyDict", (_EasyDict,), {})  # fresh: BUILD may set attributes

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if (module, name) in (("dnnlib.util", "EasyDict"), ("dnnlib", "EasyDict")):
            return self.easy_dict
        if module.startswith("numpy"):
            value = _numpy_global(module, name)
            if value is not None:
                return value
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            return _torch_module_record(module, name)
        if module == "dnnlib.tflib.network" and name == "Network":
            raise ModelFileError(
                f"{self.source} is a TensorFlow StyleGAN/StyleGAN2 pickle; convert it to the "
                "PyTorch format with NVIDIA's legacy.py (stylegan2-ada-pytorch or stylegan3) "
                "first, or use the PyTorch release of the same network"
            )
        raise ModelFileError(
            f"refusing to load {self.source}: the pickle asks for {module}.{name}, which is not "
            "a known network component (network pickles are read without running code from the "
            "file; nothing was executed)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ModelFileError(
            f"{self.source} uses pickle persistent ids: it is a torch.save file, not a network "
            "pickle"
        )


# ----------------------------------------------------------------------------
# Reading the file.


def looks_like_network_pickle(path: Path) -> bool:
    """A plain pickle (protocol >= 2), not a torch.save file (zip, or legacy with its magic)."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if len(head) < 4 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    pos = 2
    if head[pos] == 0x95:  # FRAME (protocol 4+): 8-byte length follows
        pos += 9
    # torch's legacy format starts with the pickled magic number: a LONG1 opcode.
    return pos < len(head) and head[pos] != 0x8A


def read_network_pickle(path: Path) -> dict[str, Any]:
    """The pickle's top-level dict with networks as `PersistentObject`s (no code executed)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    with path.open("rb") as f:
        return read_network_pickle_stream(f, source=str(path))


def read_network_pickle_stream(stream: Any, source: str = "network pickle") -> dict[str, Any]:
    try:
        data = _RestrictedUnpickler(stream, source).load()
    except ModelFileError:
        raise
    except Exception as exc:  # truncated or corrupt files raise many types
        raise ModelFileError(
            f"cannot read network pickle {source}: {type(exc).__name__}: {exc}. "
            "Re-download it if it may be truncated."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("G_ema"), PersistentObject):
        raise ModelFileError(
            f"{source} is not an NVIDIA network pickle: expected a dict with a 'G_ema' network"
        )
    return data


def module_tensors(obj: PersistentObject | TorchModuleRecord, prefix: str = "") -> dict[str, Any]:
    """The `state_dict` a real module would give: parameters and persistent buffers by path."""
    state = getattr(obj, "state", None) or {}
    out: dict[str, torch.Tensor] = {}
    params = state.get("_parameters") or {}
    buffers = state.get("_buffers") or {}
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in [*params.items(), *buffers.items()]:
        if value is None or (name in non_persistent and name in buffers):
            continue
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"{prefix}{name} in the network pickle is not a tensor")
        out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentObject, TorchModuleRecord)):
            raise ModelFileError(f"{prefix}{name} in the network pickle is not a module")
        out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def plain(value: Any) -> Any:
    """Init kwargs as plain Python: EasyDicts -> dicts, numpy scalars -> Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


_GENERATOR_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")


def init_kwargs_of(obj: PersistentObject) -> dict[str, Any]:
    """The constructor arguments NVIDIA's persistence recorded (positional ones named)."""
    kwargs = plain(obj.state.get("_init_kwargs") or {})
    args = plain(obj.state.get("_init_args") or ())
    if len(args) > len(_GENERATOR_ARGS):
        raise ModelFileError(f"unexpected positional arguments for {obj.class_name}: {args}")
    kwargs.update(dict(zip(_GENERATOR_ARGS, args, strict=False)))
    return kwargs


def _children(obj: PersistentObject | TorchModuleRecord) -> dict[str, Any]:
    return dict((getattr(obj, "state", None) or {}).get("_modules") or {})


def network_family(g: PersistentObject) -> str:
    """'stylegan2' or 'stylegan3', from the generator's module tree (not from its code)."""
    synthesis = _children(g).get("synthesis")
    if isinstance(synthesis, PersistentObject):
        blocks = _children(synthesis)
        if "b4" in blocks:
            return "stylegan2"
        if "input" in blocks and any(name.startswith("L0_") for name in blocks):
            return "stylegan3"
    hint = f" ({g.docstring})" if g.docstring else ""
    raise ModelFileError(
        f"unsupported generator {g.class_name!r}{hint}: not a StyleGAN2 or StyleGAN3 network "
        "as released by NVIDIA"
    )


def _stylegan3_builder() -> Callable[..., Generator]:
    try:
        from pulse_core.generators.stylegan3 import StyleGAN3Generator
    except ImportError:
        raise ModelFileError(
            "this is a StyleGAN3 network pickle, but StyleGAN3 support is not installed in this "
            "build (pulse_core.generators.stylegan3 is missing)"
        ) from None
    return StyleGAN3Generator.from_init_kwargs


def generator_from_network_pickle(
    data: Mapping[str, Any],  # what read_network_pickle returned
    *,
    checksum: str | None = None,  # sha256 of the file (the Gaussian fit's cache key)
    fit_samples: int = FIT_SAMPLES,  # z samples for the Gaussian fit of W
    fit_seed: int = FIT_SEED,  # their seed (StyleGAN3's builder always uses FIT_SEED)
    use_fit_cache: bool = True,  # keep the fit in <cache>/.gaussian-fits by checksum
) -> Generator:
    """Our generator for a read pickle's `G_ema`: weights loaded strictly, Gaussian fit set."""
    g = data["G_ema"]
    if g.version != PERSISTENCE_VERSION:
        raise ModelFileError(
            f"network pickle written by torch_utils.persistence version {g.version}; "
            f"version {PERSISTENCE_VERSION} (StyleGAN2-ADA / StyleGAN3 PyTorch) is supported"
        )
    family = network_family(g)
    kwargs = init_kwargs_of(g)
    tensors = module_tensors(g)
    if family == "stylegan2":
        gen = StyleGAN2Generator.from_init_kwargs(kwargs, tensors)
        ensure_gaussian_fit(gen, checksum, fit_samples, fit_seed, use_cache=use_fit_cache)
        return gen
    cached = load_cached_fit(checksum, fit_samples, FIT_SEED) if use_fit_cache else None
    gen = _stylegan3_builder()(kwargs, tensors, fit=cached, fit_samples=fit_samples)
    fit = getattr(gen, "fit", None)
    if cached is None and use_fit_cache and isinstance(fit, GaussianFit):
        store_cached_fit(fit, checksum, fit_samples, FIT_SEED)
    return gen


def load_network_pickle(
    path: Path,
    checksum: str | None = None,  # sha256 of the file (the Gaussian fit's cache key)
    *,
    fit_samples: int = FIT_SAMPLES,
    fit_seed: int = FIT_SEED,
    use_fit_cache: bool = True,
) -> Generator:
    """Read an NVIDIA `.pkl` without running its code and build its `G_ema` in ours."""
    return generator_from_network_pickle(
        read_network_pickle(Path(path)),
        checksum=checksum,
        fit_samples=fit_samples,
        fit_seed=fit_seed,
        use_fit_cache=use_fit_cache,
    )
