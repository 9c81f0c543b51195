"""Load a generator by catalogue name or from files, once per process.

Formats are recognised from the file's contents, not its name: a DCGAN checkpoint
(`{"netG_state_dict": ...}`), the PULSE StyleGAN v1 files (`synthesis.pt`, with `mapping.pt`
and/or `gaussian_fit.pt` beside it), NVIDIA StyleGAN2-ADA / StyleGAN3 network pickles (read by
a restricted unpickler, `nvidia_pickle.py`) and rosinality StyleGAN2 checkpoints
(`{"g_ema": ...}`). Torch files go through `torch.load(weights_only=True)`: model files are data,
never code.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
from pathlib import Path

import torch

from pulse_core.errors import ModelFileError
from pulse_core.generators import catalogue, nvidia_pickle, rosinality
from pulse_core.generators.base import Generator
from pulse_core.generators.dcgan import DCGANGenerator
from pulse_core.generators.gaussian_fit import (
    LEAKY_RELU,
    GaussianFit,
    cached_gaussian_fit,
    compute_gaussian_fit,
    load_gaussian_fit,
)
from pulse_core.generators.stylegan1 import (
    StyleGAN1Generator,
    StyleGAN1Mapping,
    mapping_from_state_dict,
    synthesis_from_state_dict,
)

# The one piece of global state: generators already loaded in this process, by (path, device).
_CACHE: dict[tuple[str, str, str], Generator] = {}
_CACHE_LOCK = threading.RLock()
_LOADS: dict[str, int] = {}  # loads per model name in this process: shows the cache works


def load_counts() -> dict[str, int]:
    """How many times each model was loaded from disk by this process (not served from cache)."""
    with _CACHE_LOCK:
        return dict(_LOADS)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        # rosinality's train.py saves its argparse.Namespace beside the weights: plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"cannot read model file {path}: {exc}. Is it a PyTorch checkpoint? "
            "Re-download it if it may be truncated."
        ) from None


def load_generator(
    model: str | Path,
    device: str | torch.device = "cpu",
    *,
    use_cache: bool = True,
    allow_download: bool = False,
) -> Generator:
    """Return the frozen generator for a catalogue name or a file/folder path, on `device`.

    Files are verified against their published or pinned sha256 by the catalogue first; the
    generator carries that name and checksum into every manifest row it produces.
    """
    resolved = catalogue.resolve(model, allow_download=allow_download)
    key = (str(Path(resolved.path).resolve()), resolved.sha256, str(torch.device(device)))
    if not use_cache:
        return _load(resolved, device)
    # Loading under the lock: threads of one worker asking at once load the model once.
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(resolved, device)
        return _CACHE[key]


def _load(resolved: catalogue.ResolvedModel, device: str | torch.device) -> Generator:
    gen = load_generator_file(Path(resolved.path), checksum=resolved.sha256).to(device)
    gen.model_id = resolved.name
    _LOADS[resolved.name] = _LOADS.get(resolved.name, 0) + 1
    return gen


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        _LOADS.clear()


def load_generator_file(path: Path, checksum: str | None = None) -> Generator:
    """Recognise and load one model file or folder (no caching, no catalogue).

    `checksum` is the already verified sha256; without it the main file is hashed here.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("synthesis.pt", "weights.tar"):
            if (path / name).is_file():
                return load_generator_file(path / name, checksum)
        raise ModelFileError(
            f"{path} holds no known model file (expected synthesis.pt [+ mapping.pt, gaussian_fit.pt] "
            "for StyleGAN v1, or a DCGAN weights.tar)"
        )
    # NVIDIA network pickles are plain pickles: read by a restricted unpickler, never torch.load.
    data = None if nvidia_pickle.looks_like_network_pickle(path) else _torch_load(path)
    if data is None:
        checksum = checksum or sha256_of(path)
        gen: Generator = nvidia_pickle.load_network_pickle(path, checksum)
    elif rosinality.is_rosinality_checkpoint(data):
        checksum = checksum or sha256_of(path)
        gen = rosinality.load_rosinality_checkpoint(data, checksum, source=str(path))
    elif isinstance(data, dict) and "netG_state_dict" in data:
        gen = DCGANGenerator.from_state_dict(data["netG_state_dict"])
    elif isinstance(data, dict) and "main.0.weight" in data:
        gen = DCGANGenerator.from_state_dict(data)  # a bare DCGAN state_dict
    elif isinstance(data, dict) and "blocks.4x4.const" in data:
        gen = _load_stylegan1(path, data)
    elif isinstance(data, dict) and "dense0.weight" in data:
        raise ModelFileError(
            f"{path} is a StyleGAN v1 mapping network; load the synthesis.pt beside it instead"
        )
    else:
        raise ModelFileError(
            f"{path}: unrecognised model format; supported: DCGAN checkpoints, the PULSE "
            "StyleGAN v1 synthesis.pt/mapping.pt/gaussian_fit.pt files, NVIDIA StyleGAN2/3 "
            "network pickles (.pkl) and rosinality StyleGAN2 checkpoints ({'g_ema': ...})"
        )
    gen.model_id = path.parent.name if path.name in ("synthesis.pt", "weights.tar") else path.stem
    gen.checksum = checksum or sha256_of(path)
    return gen.freeze()


def _load_stylegan1(synthesis_path: Path, state: dict) -> StyleGAN1Generator:
    synthesis = synthesis_from_state_dict(state)
    folder = synthesis_path.parent
    mapping = None
    if (folder / "mapping.pt").is_file():
        mapping_state = _torch_load(folder / "mapping.pt")
        if not isinstance(mapping_state, dict):
            raise ModelFileError(f"{folder / 'mapping.pt'} is not a state_dict")
        mapping = mapping_from_state_dict(mapping_state)
    fit = gaussian_fit_for(folder, mapping)
    return StyleGAN1Generator(synthesis, fit.mean, fit.std, mapping=mapping)  # checks its size


def gaussian_fit_for(folder: Path, mapping: StyleGAN1Mapping | None) -> GaussianFit:
    """The authors' fit shipped beside the weights, else the one computed from `mapping.pt`.

    A computed fit follows the cache policy of every family (`cached_gaussian_fit`): kept in the
    model cache under the sha256 of `mapping.pt`, the file it derives from, never written into
    the model folder (which may be read-only, shared, or a user's own).
    """
    shipped = folder / "gaussian_fit.pt"
    if shipped.is_file():
        return load_gaussian_fit(shipped)
    if mapping is None:
        raise ModelFileError(
            f"no gaussian_fit.pt and no mapping.pt in {folder}: StyleGAN v1 needs one of them "
            "(the fit is computed from mapping.pt once and cached)"
        )
    net = mapping.eval()
    return cached_gaussian_fit(
        lambda: compute_gaussian_fit(net, z_dim=net.z_dim, inverse=LEAKY_RELU.inverse),
        sha256_of(folder / "mapping.pt"),
        dims=net.w_dim,
    )
