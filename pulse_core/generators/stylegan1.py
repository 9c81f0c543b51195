"""StyleGAN v1 (Karras et al., CVPR 2019) in the layout of the PULSE authors' PyTorch port.

Matches pulse-reference.md section 8: equalised learning rate (raw weights scaled at run time),
style modulation through `x * (s0 + 1) + s1` after instance norm, per-layer noise, nearest x2
upsampling (fused transposed conv from 128 px up), the [1, 2, 1] blur, and a linear toRGB.
Module names mirror the `synthesis.pt` / `mapping.pt` keys so both files load strictly; channel
counts are inferred from the tensors, so any power-of-two resolution 8..1024 works.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from pulse_core.errors import ModelFileError
from pulse_core.generators.base import (
    FeatureEdit,
    StyleGenerator,
    require_same_tensors,
    run_segment,
)
from pulse_core.generators.gaussian_fit import LEAKY_RELU, GaussianFit

SQRT2 = math.sqrt(2.0)
_T = TypeVar("_T")

# ----------------------------------------------------------------------------
# Fast path (on by default, `StyleGAN1Synthesis.use_fast_path(False)` restores the plain code).
#
# The search only differentiates w.r.t. the inputs (w, noise) of a frozen network, so:
# - tensors derived from the weights (scaled weights, composed kernels) are built once and kept in
#   a plain attribute (never in the state_dict), rebuilt when a source tensor changes (its version
#   counter moves on `load_state_dict`/in-place edits; `.to()` gives new storage);
# - the upsampling conv runs as one stride-2 transposed conv with the 4x4 kernel made of the 3x3
#   kernel's four 1-pixel shifts (the reference's fused formula; for the nearest-upsampling path
#   the kernel is flipped first, which makes it equal to upsample + 3x3 conv), then the blur as a
#   depthwise conv that also adds the bias;
# - the epilogue (noise, LeakyReLU, instance norm, style) is one autograd Function with a
#   hand-written backward: fewer full-resolution passes and temporaries than autograd's graph;
# - on the CPU activations are channels-last (oneDNN's convs are several times faster on the
#   16..64-channel high-resolution layers in that layout).
# Every rewrite is the same math as the reference up to float32 rounding; the reference
# formulation is kept below each fast branch and tests/test_stylegan1_fast_path.py compares them.


def _derived(
    module: nn.Module, name: str, sources: tuple[torch.Tensor, ...], build: Callable[[], _T]
) -> _T:
    """`build()` cached on `module` while every source tensor is unchanged and frozen."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()  # weights being trained: derive them inside the graph every call
    try:
        key = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    except RuntimeError:  # inference-mode tensors have no version counter: do not cache
        return build()
    cache: dict[str, tuple[tuple, Any]] = module.__dict__.setdefault("_derived_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():
        value = build()
    cache[name] = (key, value)
    return value


def _shift_sum_kernel(w: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (in, out, 4, 4): the kernel's four 1-pixel shifts summed (section 8)."""
    w = F.pad(w.permute(1, 0, 2, 3), (1, 1, 1, 1))
    return w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]


def _use_channels_last(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.ndim == 4


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over H, W of a * b per (n, c), as (N, C, 1, 1).

    Measured against bmm/einsum formulations (either layout): the plain product and sum wins.
    """
    return (a * b).sum(dim=(2, 3), keepdim=True)


def _instance_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (n, c) mean and biased variance over H, W, both (N, C, 1, 1).

    Large maps: the batch-norm statistics kernel `F.instance_norm` itself uses, on a
    (1, N*C, H, W) view (channels-last: one sample at a time, so nothing is copied). It always
    opens a parallel region (one task per channel), which costs tens of ms on a busy 2-core
    machine whatever the size, so small maps (16x16 and below at 512 channels) use a plain
    two-pass mean / mean of squared deviations instead. Other devices: `torch.var_mean`.
    """
    n, c, h, w = y.shape
    if y.device.type != "cpu":
        var, mean = torch.var_mean(y, dim=(2, 3), unbiased=False, keepdim=True)
        return mean, var
    if c * h * w <= 1 << 17:
        mean = y.mean(dim=(2, 3), keepdim=True)
        d = y - mean
        return mean, (d * d).mean(dim=(2, 3), keepdim=True)
    if y.is_contiguous():
        mean, var = torch.batch_norm_update_stats(y.view(1, n * c, h, w), None, None, 0.0)
    else:
        stats = [torch.batch_norm_update_stats(y[i : i + 1], None, None, 0.0) for i in range(n)]
        mean = torch.cat([m for m, _ in stats])
        var = torch.cat([v for _, v in stats])
    return mean.view(n, c, 1, 1), var.view(n, c, 1, 1)


class _FusedEpilogue(torch.autograd.Function):
    """out = IN(leaky_0.2(x + nw * noise)) * (s0 + 1) + s1 with a hand-written backward.

    Gradients flow to x, noise and style (N, 2, C); the noise strength nw must be frozen.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        noise: torch.Tensor,
        noise_weight: torch.Tensor,
        style: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        n, c = x.shape[:2]
        y = torch.addcmul(x, noise_weight.view(1, c, 1, 1), noise)
        F.leaky_relu_(y, 0.2)
        mean, var = _instance_stats(y)
        rstd = 1.0 / torch.sqrt(var + eps)
        gamma = style[:, 0].reshape(n, c, 1, 1) + 1.0
        scale = gamma * rstd
        shift = style[:, 1].reshape(n, c, 1, 1) - mean * scale
        out = torch.addcmul(shift, y, scale)
        ctx.save_for_backward(y, noise_weight, mean, rstd, scale)
        ctx.noise_shape = noise.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        y, noise_weight, mean, rstd, scale = ctx.saved_tensors
        n, c, h, w = y.shape
        need_x, need_noise, _, need_style, _ = ctx.needs_input_grad
        sum_g = grad.sum(dim=(2, 3), keepdim=True)
        # sum(g * x_hat) with x_hat = (y - mean) * rstd
        sum_gx = (_channel_dot(grad, y) - mean * sum_g) * rstd
        g_style = None
        if need_style:
            g_style = torch.stack([sum_gx.view(n, c), sum_g.view(n, c)], dim=1)
        if not (need_x or need_noise):
            return None, None, None, g_style, None
        # instance-norm backward with the style's (s0 + 1) as gamma:
        # dy = gamma * rstd * (g - mean(g) - x_hat * mean(g * x_hat)) = k1 * g + k2 * y + k3
        hw = h * w
        k2 = -scale * rstd * (sum_gx / hw)
        k3 = -scale * (sum_g / hw) - k2 * mean
        dy = torch.addcmul(k3, grad, scale)
        dy.addcmul_(y, k2)
        # LeakyReLU backward from its output: the slope is positive, so y > 0 iff its input > 0
        dx = torch.ops.aten.leaky_relu_backward(dy, y, 0.2, True)
        del dy
        g_noise = None
        if need_noise:
            g_noise = (dx * noise_weight.view(1, c, 1, 1)).sum(dim=1, keepdim=True)
            g_noise = g_noise.sum_to_size(ctx.noise_shape)
        return (dx if need_x else None), g_noise, None, g_style, None


# ----------------------------------------------------------------------------


class EqualLinear(nn.Module):
    """Dense layer with equalised learning rate: weight * gain / sqrt(fan_in) * lrmul."""

    def __init__(
        self,
        in_features: int,  # fan-in
        out_features: int,  # outputs
        gain: float = SQRT2,  # sqrt(2) before a leaky ReLU, 1 for style affines
        lrmul: float = 1.0,  # 0.01 in the mapping network
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lrmul)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.w_mul = gain * in_features**-0.5 * lrmul
        self.b_mul = lrmul

    def scaled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * w_mul, bias * b_mul), cached while the layer is frozen."""
        return _derived(
            self,
            "scaled",
            (self.weight, self.bias),
            lambda: (self.weight * self.w_mul, self.bias * self.b_mul),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.scaled()
        return F.linear(x, w, b)


# ----------------------------------------------------------------------------


class Blur(nn.Module):
    """Depthwise 3x3 blur with the stored kernel (the [1,2,1] x [1,2,1] / 16 filter)."""

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = k[:, None] * k[None, :]
        self.register_buffer("kernel", (k / k.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, self.kernel.expand(c, -1, -1, -1), padding=1, groups=c)


class EqualConv2d(nn.Module):
    """Conv with equalised learning rate; optionally upsampling x2 first and blurring after."""

    fast_path = True  # see the "Fast path" notes above; set per instance by use_fast_path

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        kernel_size: int,  # 3 for convs, 1 for toRGB
        gain: float = SQRT2,  # sqrt(2) for convs, 1 for toRGB
        upsample: bool = False,  # x2 upsampling before the conv (conv0_up)
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.w_mul = gain * (in_channels * kernel_size**2) ** -0.5
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.intermediate = Blur() if upsample else None

    @staticmethod
    def fused_upsample(side_in: int) -> bool:
        """The reference's switch: fused transposed conv when the output side is >= 128."""
        return side_in * 2 >= 128

    def scaled_weight(self) -> torch.Tensor:
        return _derived(self, "w", (self.weight,), lambda: self.weight * self.w_mul)

    def upsample_kernels(self, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(4x4 transposed-conv kernel (in, out, 4, 4), depthwise blur kernel (out, 1, 3, 3)).

        fused: the reference's own kernel. Not fused (nearest x2, then the 3x3 conv): the same
        construction on the 180-degree-rotated kernel, which is exactly that composition.
        """
        assert self.intermediate is not None

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            w = self.weight * self.w_mul
            k4 = _shift_sum_kernel(w if fused else w.flip(2, 3)).contiguous()
            c = self.weight.shape[0]
            blur = self.intermediate.kernel.expand(c, 1, 3, 3).contiguous()
            return k4, blur

        return _derived(self, f"up{int(fused)}", (self.weight, self.intermediate.kernel), build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path:
            return self._forward_fast(x)
        w = self.weight * self.w_mul
        if not self.upsample:
            return F.conv2d(x, w, self.bias, padding=self.kernel_size // 2)
        if self.fused_upsample(min(x.shape[2:])):
            # Fused upsample+conv: the 3x3 kernel summed over its four 1-pixel shifts gives a
            # 4x4 kernel for a stride-2 transposed conv (what the original TF graph does).
            x = F.conv_transpose2d(x, _shift_sum_kernel(w), stride=2, padding=1)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = F.conv2d(x, w, padding=self.kernel_size // 2)
        assert self.intermediate is not None
        x = self.intermediate(x)
        return x + self.bias.view(1, -1, 1, 1)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if not self.upsample:
            return F.conv2d(x, self.scaled_weight(), self.bias, padding=self.kernel_size // 2)
        k4, blur = self.upsample_kernels(self.fused_upsample(min(x.shape[2:])))
        x = F.conv_transpose2d(x, k4, stride=2, padding=1)
        # the blur, then + bias, as one depthwise conv
        return F.conv2d(x, blur, self.bias, padding=1, groups=blur.shape[0])


# ----------------------------------------------------------------------------


class NoiseInput(nn.Module):
    """Adds a single-channel noise map scaled by a learned per-channel strength."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight.view(1, -1, 1, 1) * noise


class StyleMod(nn.Module):
    """AdaIN style: s = A(w) -> (scale, shift) per channel; x * (scale + 1) + shift."""

    def __init__(self, w_dim: int, channels: int) -> None:
        super().__init__()
        self.lin = EqualLinear(w_dim, channels * 2, gain=1.0)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.lin(w).view(-1, 2, x.shape[1], 1, 1)
        return x * (s[:, 0] + 1.0) + s[:, 1]


class Epilogue(nn.Module):
    """noise -> LeakyReLU(0.2) -> InstanceNorm -> style modulation."""

    fast_path = True

    def __init__(self, channels: int, w_dim: int) -> None:
        super().__init__()
        self.noise = NoiseInput(channels)
        self.style_mod = StyleMod(w_dim, channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        nw = self.noise.weight
        if self.fast_path and not (nw.requires_grad and torch.is_grad_enabled()):
            style = self.style_mod.lin(w).view(-1, 2, x.shape[1])
            return _FusedEpilogue.apply(x, noise.to(x.dtype), nw, style, 1e-5)
        x = self.noise(x, noise)
        x = F.leaky_relu(x, 0.2)
        x = F.instance_norm(x, eps=1e-5)
        return self.style_mod(x, w)


class InputBlock(nn.Module):
    """4x4: learned constant + bias, epilogue, 3x3 conv, epilogue."""

    fast_path = True

    def __init__(self, channels: int, w_dim: int) -> None:
        super().__init__()
        self.const = nn.Parameter(torch.ones(1, channels, 4, 4))
        self.bias = nn.Parameter(torch.ones(channels))
        self.epi1 = Epilogue(channels, w_dim)
        self.conv = EqualConv2d(channels, channels, 3)
        self.epi2 = Epilogue(channels, w_dim)

    def forward(self, batch: int, w: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        x = self.const.expand(batch, -1, -1, -1) + self.bias.view(1, -1, 1, 1)
        if self.fast_path and _use_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.epi1(x, w[:, 0], noise[0])
        x = self.conv(x)
        return self.epi2(x, w[:, 1], noise[1])


class SynthesisBlock(nn.Module):
    """R x R (R >= 8): upsampling conv + blur, epilogue, 3x3 conv, epilogue."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv0_up = EqualConv2d(in_channels, out_channels, 3, upsample=True)
        self.epi1 = Epilogue(out_channels, w_dim)
        self.conv1 = EqualConv2d(out_channels, out_channels, 3)
        self.epi2 = Epilogue(out_channels, w_dim)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv0_up(x)
        x = self.epi1(x, w[:, 0], noise[0])
        x = self.conv1(x)
        return self.epi2(x, w[:, 1], noise[1])


# ----------------------------------------------------------------------------


def default_channels(resolution: int, fmap_base: int = 8192, fmap_max: int = 512) -> list[int]:
    """Channels per block 4x4..RxR: nf(stage) = min(fmap_base / 2^stage, fmap_max)."""
    log2 = int(math.log2(resolution))
    return [min(fmap_base // 2 ** (res - 1), fmap_max) for res in range(2, log2 + 1)]


class StyleGAN1Synthesis(nn.Module):
    """The synthesis network: w (B, L, w_dim) + L noise maps -> raw RGB (B, 3, R, R)."""

    def __init__(
        self,
        resolution: int = 1024,  # output side, a power of two in 8..1024
        channels: list[int] | None = None,  # channels per block 4x4..RxR; None = the FFHQ config
        w_dim: int = 512,  # size of each style vector
    ) -> None:
        super().__init__()
        log2 = int(math.log2(resolution))
        if 2**log2 != resolution or not 8 <= resolution <= 1024:
            raise ModelFileError(
                f"StyleGAN v1 resolution must be a power of two 8..1024, got {resolution}"
            )
        channels = channels or default_channels(resolution)
        assert len(channels) == log2 - 1, "one channel count per block"
        self.resolution = resolution
        self.w_dim = w_dim
        blocks: dict[str, nn.Module] = {}
        for i, ch in enumerate(channels):
            side = 2 ** (i + 2)
            name = f"{side}x{side}"
            blocks[name] = (
                InputBlock(ch, w_dim) if i == 0 else SynthesisBlock(channels[i - 1], ch, w_dim)
            )
        self.blocks = nn.ModuleDict(blocks)
        self.torgb = EqualConv2d(channels[-1], 3, 1, gain=1.0)

    @property
    def num_layers(self) -> int:
        return 2 * len(self.blocks)

    @property
    def num_ws(self) -> int:
        """Style inputs (= num_layers): the name StyleGenerator shares with NVIDIA's networks."""
        return self.num_layers

    @property
    def img_resolution(self) -> int:
        return self.resolution

    @property
    def fast_path(self) -> bool:
        return bool(self.torgb.fast_path)

    def use_fast_path(self, enabled: bool = True) -> StyleGAN1Synthesis:
        """Switch between the optimised formulation (default) and the plain reference code."""
        for m in self.modules():
            if isinstance(m, EqualConv2d | Epilogue | InputBlock):
                m.fast_path = enabled
        return self

    def clear_cache(self) -> None:
        """Drop the tensors derived from the weights (they are rebuilt on the next forward)."""
        for m in self.modules():
            m.__dict__.pop("_derived_cache", None)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()  # .to() / .float() etc.: do not keep derived tensors on the old device
        return super()._apply(fn, *args, **kwargs)

    def forward(
        self,
        w: torch.Tensor,  # (B, num_layers, w_dim)
        noise: list[torch.Tensor],  # num_layers maps (B or 1, 1, side, side)
        edit: FeatureEdit | None = None,  # applied to each block's output, by the block's name
        checkpoint: bool = False,  # activation checkpointing per block (base.run_segment)
    ) -> torch.Tensor:
        assert w.ndim == 3 and w.shape[1] == self.num_layers, f"w must be (B, {self.num_layers}, D)"
        assert len(noise) == self.num_layers, f"need {self.num_layers} noise maps"
        x = torch.empty(0)
        for i, (name, block) in enumerate(self.blocks.items()):
            ws, ns = w[:, 2 * i : 2 * i + 2], noise[2 * i : 2 * i + 2]
            x = run_segment(block, w.shape[0] if i == 0 else x, ws, ns, checkpoint=checkpoint)
            if edit is not None:
                x = edit(name, x)
        # the fast path runs channels-last on the CPU; callers get the usual contiguous layout
        return self.torgb(x).contiguous()


class StyleGAN1Mapping(nn.Module):
    """z -> w: pixel norm, then `depth` x [dense (lrmul 0.01), LeakyReLU(0.2)]."""

    def __init__(self, z_dim: int = 512, w_dim: int = 512, depth: int = 8) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.w_dim = w_dim
        self.depth = depth
        for i in range(depth):
            self.add_module(f"dense{i}", EqualLinear(z_dim if i == 0 else w_dim, w_dim, lrmul=0.01))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        for i in range(self.depth):
            x = F.leaky_relu(getattr(self, f"dense{i}")(x), 0.2)
        return x


# ----------------------------------------------------------------------------


class StyleGAN1Generator(StyleGenerator):
    """Synthesis + Gaussian fit of W (+ the mapping network when it was loaded)."""

    family = "stylegan1"
    final_activation = LEAKY_RELU  # the mapping ends in LeakyReLU(0.2), no gain

    def __init__(
        self,
        synthesis: StyleGAN1Synthesis,
        fit_mean: torch.Tensor,  # (w_dim,) mean of LeakyReLU_5(mapping(z))
        fit_std: torch.Tensor,  # (w_dim,) std of the same
        mapping: StyleGAN1Mapping | None = None,
    ) -> None:
        super().__init__()
        self.synthesis = synthesis
        self.mapping = mapping
        # persistent: a StyleGAN v1 generator's state_dict has always carried its fit
        self._init_fit(GaussianFit(mean=fit_mean, std=fit_std), persistent=True)

    @property
    def noise_shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple((2 ** (i // 2 + 2), 2 ** (i // 2 + 2)) for i in range(self.num_latents))

    def feature_layers(self) -> dict[str, int]:
        """Each block's output feature map: "4x4", "8x8", ... (the side before toRGB)."""
        return {name: 2 ** (i + 2) for i, name in enumerate(self.synthesis.blocks)}

    def synthesize(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        return self.synthesis(w, noise, edit)

    supports_checkpoint = True

    def synthesize_checkpointed(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        return self.synthesis(w, noise, edit, checkpoint=True)


# ----------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^blocks\.(\d+)x\1\.")


def synthesis_from_state_dict(state: dict[str, torch.Tensor]) -> StyleGAN1Synthesis:
    """Build a synthesis network whose sizes are read from the tensors, then load strictly."""
    sides = sorted({int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))})
    if not sides or sides[0] != 4 or "blocks.4x4.const" not in state:
        raise ModelFileError(
            "not a StyleGAN v1 synthesis state_dict (expected keys like 'blocks.4x4.const'); "
            "pass the PULSE 'synthesis.pt' file"
        )
    channels = [int(state["blocks.4x4.const"].shape[1])]
    channels += [int(state[f"blocks.{s}x{s}.conv1.weight"].shape[0]) for s in sides[1:]]
    w_dim = int(state["blocks.4x4.epi1.style_mod.lin.weight"].shape[1])
    net = StyleGAN1Synthesis(resolution=sides[-1], channels=channels, w_dim=w_dim)
    _load_strict(net, state, "synthesis")
    return net


def mapping_from_state_dict(state: dict[str, torch.Tensor]) -> StyleGAN1Mapping:
    depth = len([k for k in state if re.fullmatch(r"dense\d+\.weight", k)])
    if depth == 0:
        raise ModelFileError(
            "not a StyleGAN v1 mapping state_dict (expected keys 'dense0.weight', ...); "
            "pass the PULSE 'mapping.pt' file"
        )
    z_dim = int(state["dense0.weight"].shape[1])
    w_dim = int(state["dense0.weight"].shape[0])
    net = StyleGAN1Mapping(z_dim=z_dim, w_dim=w_dim, depth=depth)
    _load_strict(net, state, "mapping")
    return net


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    require_same_tensors(net.state_dict(), state, f"StyleGAN v1 {what} file does not match")
    net.load_state_dict(state, strict=True)
