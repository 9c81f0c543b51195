"""rosinality/stylegan2-pytorch checkpoints on our StyleGAN2 module.

The checkpoints (`{"g_ema": state_dict, "latent_avg": w_avg, ...}` from `convert_weight.py`, or
`train.py`'s with `g`, `d` and optimiser states beside `g_ema`) hold the same StyleGAN2 config F
generator as NVIDIA's in another layout:

    style.{1..n_mlp}.weight/bias                    mapping.fc{0..n_mlp-1}.weight/bias
    input.input [1, C, 4, 4]                         synthesis.b4.const [C, 4, 4]
    conv1 / to_rgb1                                  synthesis.b4.conv1 / synthesis.b4.torgb
    convs.{2k} / convs.{2k+1} / to_rgbs.{k}          synthesis.b{2^(k+3)}.conv0 / conv1 / torgb
      .conv.weight [1, O, I, k, k]                     .weight [O, I, k, k]
      .conv.modulation.weight/bias                     .affine.weight/bias
      .noise.weight [1]                                .noise_strength []
      .activate.bias [O]                               .bias [O]
      .conv.blur.kernel (x4), .upsample.kernel (x4)    .resample_filter (normalised)
      (ToRGB) .bias [1, 3, 1, 1]                       .bias [3]
    noises.noise_{i} [1, 1, r, r]                    noise_const [r, r] of synthesis layer i
    latent_avg                                       mapping.w_avg

The math is NVIDIA's: rosinality's `Blur(pad=(1, 1))` after the stride-2 transposed conv and
`Upsample` (zero insertion, pad (2, 1), kernel x4) are exactly `conv2d_resample` and
`upsample2d` with the [1, 3, 3, 1] filter, `fused_leaky_relu` is `bias_act` 'lrelu' (gain
sqrt(2)), there is no conv clamp. Two products are rounded differently: rosinality scales the
raw conv weight by 1/sqrt(fan_in) before modulating (NVIDIA leaves it to the demodulation) and
scales toRGB weights rather than styles; the module reproduces both (`conv_weight_gain`,
`torgb_gain_on_weight`), and the dense layers use rosinality's `(1/sqrt(in)) * lr_mul`.
`lr_mlp` (0.01) is not stored in checkpoints; pass another value if the network was trained
with one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pulse_core.errors import ModelFileError
from pulse_core.generators.gaussian_fit import FIT_SAMPLES, FIT_SEED, ensure_gaussian_fit
from pulse_core.generators.stylegan2 import (
    MappingNetwork,
    StyleGAN2Generator,
    SynthesisNetwork,
    check_coverage,
)

_STYLE_RE = re.compile(r"^style\.(\d+)\.weight$")
_TO_RGBS_RE = re.compile(r"^to_rgbs\.(\d+)\.conv\.weight$")


def is_rosinality_checkpoint(data: object) -> bool:
    """A dict with a `g_ema` state_dict in rosinality's layout."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("g_ema"), Mapping)
        and "input.input" in data["g_ema"]
    )


def _tensor(state: Mapping[str, Any], key: str) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise ModelFileError(f"rosinality checkpoint: g_ema has no tensor {key!r}")
    return value


def _layer_path(index: int) -> str:
    """Our name of synthesis layer `index` (rosinality's noise order)."""
    if index == 0:
        return "synthesis.b4.conv1"
    k, second = divmod(index - 1, 2)
    return f"synthesis.b{2 ** (k + 3)}.conv{second}"


def _conv_path(j: int) -> str:
    k, second = divmod(j, 2)
    return f"synthesis.b{2 ** (k + 3)}.conv{second}"


def rosinality_key_map(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """rosinality key -> our key for every tensor the checkpoint's generator holds."""
    mapping: dict[str, str] = {}
    for key in state:
        parts = key.split(".")
        if m := re.fullmatch(r"style\.(\d+)\.(weight|bias)", key):
            mapping[key] = f"mapping.fc{int(m.group(1)) - 1}.{m.group(2)}"
        elif key == "input.input":
            mapping[key] = "synthesis.b4.const"
        elif parts[0] == "conv1":
            mapping[key] = _styled_conv_key("synthesis.b4.conv1", parts[1:])
        elif parts[0] == "to_rgb1":
            mapping[key] = _torgb_key("synthesis.b4", parts[1:])
        elif parts[0] == "convs" and len(parts) > 2 and parts[1].isdigit():
            mapping[key] = _styled_conv_key(_conv_path(int(parts[1])), parts[2:])
        elif parts[0] == "to_rgbs" and len(parts) > 2 and parts[1].isdigit():
            mapping[key] = _torgb_key(f"synthesis.b{2 ** (int(parts[1]) + 3)}", parts[2:])
        elif m := re.fullmatch(r"noises\.noise_(\d+)", key):
            mapping[key] = f"{_layer_path(int(m.group(1)))}.noise_const"
    return {k: v for k, v in mapping.items() if v}


def _styled_conv_key(prefix: str, rest: list[str]) -> str:
    name = ".".join(rest)
    ours = {
        "conv.weight": "weight",
        "conv.modulation.weight": "affine.weight",
        "conv.modulation.bias": "affine.bias",
        "conv.blur.kernel": "resample_filter",
        "noise.weight": "noise_strength",
        "activate.bias": "bias",
    }.get(name)
    return f"{prefix}.{ours}" if ours else ""


def _torgb_key(block: str, rest: list[str]) -> str:
    name = ".".join(rest)
    if name == "upsample.kernel":
        return f"{block}.resample_filter"
    ours = {
        "conv.weight": "weight",
        "conv.modulation.weight": "affine.weight",
        "conv.modulation.bias": "affine.bias",
        "bias": "bias",
    }.get(name)
    return f"{block}.torgb.{ours}" if ours else ""


def _convert(our_key: str, value: torch.Tensor, target_shape: tuple[int, ...]) -> torch.Tensor:
    """Reshape one tensor into our layout (the x4 upsampling gain leaves the kernels)."""
    value = value.detach().float()
    if our_key.endswith("resample_filter"):
        value = value / 4.0
    if tuple(value.shape) != target_shape and value.numel() == math.prod(target_shape):
        value = value.reshape(target_shape)
    return value


def from_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    lr_mlp: float = 0.01,  # the mapping's learning-rate multiplier (rosinality's default)
    source: str = "rosinality checkpoint",
) -> StyleGAN2Generator:
    """Our StyleGAN2 with every tensor of `checkpoint["g_ema"]` in place (no Gaussian fit yet)."""
    state = checkpoint.get("g_ema")
    if not isinstance(state, Mapping) or "input.input" not in state:
        raise ModelFileError(f"{source}: expected a dict with a rosinality 'g_ema' state_dict")
    style_layers = sorted(int(m.group(1)) for k in state if (m := _STYLE_RE.match(k)))
    if not style_layers or style_layers != list(range(1, len(style_layers) + 1)):
        raise ModelFileError(f"{source}: mapping layers style.1 .. style.N are missing")
    first = _tensor(state, "style.1.weight")
    z_dim, w_dim = (
        int(first.shape[1]),
        int(_tensor(state, f"style.{style_layers[-1]}.weight").shape[0]),
    )
    n_rgbs = len([k for k in state if _TO_RGBS_RE.match(k)])
    resolution = 2 ** (n_rgbs + 2)
    channels = {4: int(_tensor(state, "input.input").shape[1])}
    for k in range(n_rgbs):
        channels[2 ** (k + 3)] = int(_tensor(state, f"convs.{2 * k}.conv.weight").shape[1])
    kernel = _resample_kernel(state, source)
    latent_avg = checkpoint.get("latent_avg")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise ModelFileError(f"{source}: latent_avg is not a tensor")

    synthesis = SynthesisNetwork(
        w_dim=w_dim,
        img_resolution=resolution,
        img_channels=3,
        channels=channels,
        architecture="skip",
        resample_filter=[1, 3, 3, 1],  # replaced by the checkpoint's kernel below
        conv_clamp=None,
        conv_weight_gain=lambda fan_in: 1 / math.sqrt(fan_in),
        torgb_gain_on_weight=True,
    )
    mapping = MappingNetwork(
        z_dim=z_dim,
        w_dim=w_dim,
        num_ws=synthesis.num_ws,
        num_layers=len(style_layers),
        activation="lrelu",
        lr_multiplier=lr_mlp,
        track_w_avg=latent_avg is not None,
    )
    for idx in range(mapping.num_layers):
        fc = getattr(mapping, f"fc{idx}")
        fc.weight_gain = (1 / math.sqrt(fc.in_features)) * lr_mlp  # rosinality's EqualLinear
    gen = StyleGAN2Generator(mapping, synthesis)

    ours = gen.state_dict()
    keys = rosinality_key_map(state)
    unmapped = sorted(k for k in state if k not in keys)
    if unmapped:
        raise ModelFileError(
            f"{source}: {len(unmapped)} tensor(s) of g_ema have no place in StyleGAN2: "
            + ", ".join(unmapped[:8])
        )
    converted: dict[str, torch.Tensor] = {}
    for their_key, our_key in keys.items():
        target = ours.get(our_key)
        shape = tuple(target.shape) if target is not None else tuple(state[their_key].shape)
        converted[our_key] = _convert(our_key, state[their_key], shape)
    if latent_avg is not None:
        converted["mapping.w_avg"] = latent_avg.detach().float().reshape(-1)
    # Filters rosinality keeps only where it resamples; NVIDIA's layout has one per layer too.
    for key in ours:
        if key.endswith("resample_filter") and key not in converted:
            converted[key] = kernel.clone()
    check_coverage(ours, converted, source)
    gen.load_state_dict(converted, strict=True)
    return gen


def _resample_kernel(state: Mapping[str, Any], source: str) -> torch.Tensor:
    """The normalised FIR filter of the checkpoint (every blur/upsample kernel must agree)."""
    kernels = [
        v.detach().float() / 4.0
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and k.endswith(("blur.kernel", "upsample.kernel"))
    ]
    if not kernels:
        f = torch.tensor([1.0, 3.0, 3.0, 1.0])
        return torch.outer(f, f) / 64.0
    first = kernels[0]
    if first.ndim != 2 or any(k.shape != first.shape or not torch.equal(k, first) for k in kernels):
        raise ModelFileError(f"{source}: the blur/upsample kernels differ between layers")
    if first.shape[0] >= 8:
        raise ModelFileError(
            f"{source}: blur kernels of {first.shape[0]} taps are not supported (NVIDIA's layout "
            "keeps filters of 8+ taps separable)"
        )
    return first


def load_rosinality_checkpoint(
    data: Mapping[str, Any],  # the checkpoint as read by torch.load(weights_only=True)
    checksum: str | None = None,  # sha256 of the file (the Gaussian fit's cache key)
    *,
    lr_mlp: float = 0.01,
    fit_samples: int = FIT_SAMPLES,
    fit_seed: int = FIT_SEED,
    use_fit_cache: bool = True,
    source: str = "rosinality checkpoint",
) -> StyleGAN2Generator:
    """Build the generator of a rosinality checkpoint and attach the Gaussian fit of W."""
    gen = from_checkpoint(data, lr_mlp=lr_mlp, source=source)
    ensure_gaussian_fit(gen, checksum, fit_samples, fit_seed, use_cache=use_fit_cache)
    return gen


def read_checkpoint(path: Path) -> Any:
    """torch.load with the weights-only unpickler (a checkpoint is data, never code)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot read rosinality checkpoint {path}: {exc}") from None
