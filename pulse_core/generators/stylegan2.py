"""StyleGAN2 (Karras et al., CVPR 2020) as released in NVIDIA's StyleGAN2-ADA PyTorch code.

Matches the generator of configs E/F in `training/networks.py` (stylegan2-ada-pytorch) and
`training/networks_stylegan2.py` (stylegan3 repository), written again in plain PyTorch with no
compiled ops: a mapping network (pixel norm, `num_layers` equalised dense layers, the tracked
`w_avg`), and a synthesis network of blocks 4x4 .. RxR, each made of modulated 3x3 convolutions
with weight demodulation, per-layer noise scaled by a learned strength, bias + activation (with
its gain and the optional `conv_clamp`), and a toRGB layer whose outputs are summed through FIR
upsampling ('skip'); 'orig' and 'resnet' architectures are supported too. Resampling follows
`upfirdn2d` exactly: zero-insertion upsampling, padding, a true convolution with the normalised
[1, 3, 3, 1] filter scaled by the gain, and NVIDIA's `conv2d_resample` (a stride-2 transposed
convolution followed by the filter).

Module and tensor names mirror NVIDIA's, so `state_dict()` keys are those of the pickles'
`G_ema` (`mapping.fc0.weight`, `synthesis.b64.conv0.affine.bias`, ...). Everything runs in
float32: the releases mark their highest resolutions as fp16 for CUDA training, which NVIDIA's
own code also drops on the CPU (`force_fp32`); `num_fp16_res` is therefore accepted and ignored.

For PULSE the generator exposes W+ (`num_ws` style vectors) and its noise maps, and maps the
search's latent to W through the Gaussian fit of the mapping network's output with its final
activation undone: the mapping ends in `gain * leaky_relu(x, 0.2)` with gain sqrt(2) (NVIDIA's
`bias_act` 'lrelu', rosinality's `fused_leaky_relu`), so the fit is taken on
`leaky_relu(w / sqrt(2), 5)` and `prior(v) = sqrt(2) * leaky_relu(v * std + mean, 0.2)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
from pulse_core.generators.fir import setup_filter, upfirdn2d, upsample2d
from pulse_core.generators.gaussian_fit import FinalActivation, GaussianFit

# The fit's cache policy lives in gaussian_fit.py (one for every family); these names stay
# importable from here for nvidia_pickle.py and older callers.
from pulse_core.generators.gaussian_fit import ensure_gaussian_fit as ensure_gaussian_fit
from pulse_core.generators.gaussian_fit import fit_cache_path as fit_cache_path
from pulse_core.generators.gaussian_fit import load_cached_fit as load_cached_fit
from pulse_core.generators.gaussian_fit import store_cached_fit as store_cached_fit

SQRT2 = math.sqrt(2.0)

# Activations of NVIDIA's `bias_act` that StyleGAN2 generators use: name -> (negative slope, gain).
ACTIVATIONS: dict[str, tuple[float, float]] = {
    "linear": (1.0, 1.0),
    "relu": (0.0, SQRT2),
    "lrelu": (0.2, SQRT2),
}


def _activation(name: str) -> tuple[float, float]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ModelFileError(
            f"unsupported activation {name!r} in a StyleGAN2 network; supported: "
            f"{', '.join(ACTIVATIONS)}"
        ) from None


# ----------------------------------------------------------------------------
# Resampled convolution (FIR resampling: fir.py) and the other pure functions.


def conv2d_resample(
    x: torch.Tensor,  # [N, C_in, H, W]
    w: torch.Tensor,  # [C_out, C_in // groups, kh, kw]
    f: torch.Tensor | None = None,  # low-pass filter for upsampling
    up: int = 1,  # 1 or an integer upsampling factor
    padding: int = 0,  # w.r.t. the upsampled image
    groups: int = 1,
    flip_weight: bool = True,  # True = correlation (torch's conv2d), False = convolution
) -> torch.Tensor:
    """NVIDIA's `conv2d_resample` for the cases a StyleGAN2 generator uses (no downsampling)."""
    c_out, c_in_g, kh, kw = w.shape
    px0 = px1 = py0 = py1 = padding
    if up > 1:
        assert f is not None, "upsampling needs a filter"
        fh, fw = f.shape[0], f.shape[-1]
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
        if kh == 1 and kw == 1:  # 1x1 conv first, then upsample (their fast path)
            x = F.conv2d(x, w, groups=groups)
            return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up * up)
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, c_out // groups, c_in_g, kh, kw).transpose(1, 2)
            w = w.reshape(groups * c_in_g, c_out // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        if flip_weight:  # the transposed conv flips when the caller asked for correlation
            w = w.flip(2, 3)
        x = F.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
        pad = [px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt]
        return upfirdn2d(x, f, padding=pad, gain=up * up)
    if not flip_weight:
        w = w.flip(2, 3)
    return F.conv2d(x, w, padding=padding, groups=groups)


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None,  # [C] added along dim 1, or None
    act: str = "linear",  # 'linear' | 'relu' | 'lrelu'
    gain: float | None = None,  # None = the activation's default gain (sqrt(2) for (l)relu)
    clamp: float | None = None,  # clamp the result to [-clamp, clamp]; None = no clamp
) -> torch.Tensor:
    """NVIDIA's `bias_act`: add bias, activate, scale by the gain, clamp (in that order)."""
    slope, default_gain = _activation(act)
    if b is not None:
        x = x + b.reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
    if act != "linear":
        x = F.leaky_relu(x, slope) if slope > 0 else F.relu(x)
    gain = default_gain if gain is None else float(gain)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulated_conv2d(
    x: torch.Tensor,  # [N, C_in, H, W]
    weight: torch.Tensor,  # [C_out, C_in, kh, kw], any weight gain already applied
    styles: torch.Tensor,  # [N, C_in] modulation coefficients
    noise: torch.Tensor | None = None,  # added to the output (already scaled by its strength)
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,  # one grouped conv with per-sample weights (NVIDIA's inference
    # path) or scale the activations before and after a shared-weight conv (same math)
) -> torch.Tensor:
    """Modulate the weight by the styles, demodulate, convolve (NVIDIA's `modulated_conv2d`)."""
    n = x.shape[0]
    _, c_in, kh, kw = weight.shape
    assert x.shape[1] == c_in, f"input has {x.shape[1]} channels, weight expects {c_in}"
    assert styles.shape == (n, c_in), f"styles {tuple(styles.shape)} != {(n, c_in)}"
    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # [N, O, I, k, k]
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt() if demodulate else None  # [N, O]
    if not fused_modconv:
        x = x * styles.reshape(n, -1, 1, 1)
        x = conv2d_resample(x, weight, resample_filter, up, padding, flip_weight=flip_weight)
        if dcoefs is not None and noise is not None:
            return torch.addcmul(noise, x, dcoefs.reshape(n, -1, 1, 1))
        if dcoefs is not None:
            return x * dcoefs.reshape(n, -1, 1, 1)
        return x + noise if noise is not None else x
    if dcoefs is not None:
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, c_in, kh, kw)
    x = conv2d_resample(x, w, resample_filter, up, padding, groups=n, flip_weight=flip_weight)
    x = x.reshape(n, -1, *x.shape[2:])
    return x + noise if noise is not None else x


# ----------------------------------------------------------------------------


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalised learning rate: x @ (weight * weight_gain).T + bias * lr_mul."""

    def __init__(
        self,
        in_features: int,  # fan-in
        out_features: int,  # outputs
        bias: bool = True,  # add a bias before the activation
        activation: str = "linear",  # 'linear' | 'relu' | 'lrelu' (gain sqrt(2) for the last two)
        lr_multiplier: float = 1.0,  # 0.01 in the mapping network
        bias_init: float = 0.0,  # initial bias (1 for the style affines)
    ) -> None:
        super().__init__()
        _activation(activation)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        # Gains as the original computes them (a file format may override them with its own
        # formula for the same value, for bit-equal results: see rosinality.py).
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 2 and x.shape[1] == self.in_features, f"expected [N, {self.in_features}]"
        w = self.weight * self.weight_gain
        b = self.bias
        if b is not None and self.bias_gain != 1:
            b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


# ----------------------------------------------------------------------------


class MappingNetwork(nn.Module):
    """z -> w: normalise z's second moment, then `num_layers` equalised dense layers."""

    def __init__(
        self,
        z_dim: int,  # input latent (Z) size
        w_dim: int,  # intermediate latent (W) size
        num_ws: int,  # number of style inputs of the synthesis network (for broadcasting)
        num_layers: int = 8,  # dense layers
        layer_features: int | None = None,  # hidden width, None = w_dim
        activation: str = "lrelu",  # after every layer, the last one included
        lr_multiplier: float = 0.01,  # learning-rate multiplier of the dense layers
        track_w_avg: bool = True,  # holds the `w_avg` buffer (NVIDIA: w_avg_beta is not None)
    ) -> None:
        super().__init__()
        if z_dim <= 0:
            raise ModelFileError(
                "StyleGAN2 networks without a z input (z_dim = 0) are not supported"
            )
        self.z_dim = z_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.activation = activation
        hidden = w_dim if layer_features is None else layer_features
        features = [z_dim] + [hidden] * (num_layers - 1) + [w_dim]
        for idx in range(num_layers):
            layer = FullyConnectedLayer(
                features[idx],
                features[idx + 1],
                activation=activation,
                lr_multiplier=lr_multiplier,
            )
            setattr(self, f"fc{idx}", layer)
        if track_w_avg:
            self.register_buffer("w_avg", torch.zeros([w_dim]))
        else:
            self.w_avg: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """One w per z: [N, z_dim] -> [N, w_dim] (broadcast to W+ with `Generator.mapping_ws`)."""
        assert z.ndim == 2 and z.shape[1] == self.z_dim, f"z must be [N, {self.z_dim}]"
        x = normalize_2nd_moment(z.to(torch.float32))
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        return x


# ----------------------------------------------------------------------------


class SynthesisLayer(nn.Module):
    """Modulated conv (optionally x2 upsampling) + scaled noise + bias + activation (+ clamp)."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        w_dim: int,  # style vector size
        resolution: int,  # output side of this layer
        kernel_size: int = 3,  # conv kernel side
        up: int = 1,  # 2 = upsample x2 before the conv (conv0 of each block)
        use_noise: bool = True,  # has a noise input (noise_const, noise_strength)
        activation: str = "lrelu",  # after the bias, with the activation's gain
        resample_filter: Sequence[float] = (1, 3, 3, 1),  # FIR taps for upsampling
        conv_clamp: float | None = None,  # clamp the output to +-X, None = no clamp
        weight_gain: float = 1.0,  # scales the raw weight before modulation: 1 in NVIDIA's code
        # (demodulation cancels it), 1/sqrt(fan_in) in rosinality's (same result, other rounding)
    ) -> None:
        super().__init__()
        _, act_gain = _activation(activation)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.act_gain = act_gain
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.weight_gain = weight_gain
        self.fused_modconv = False  # see SynthesisNetwork.set_fused_modconv
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self,
        x: torch.Tensor,  # [N, in_channels, resolution / up, resolution / up]
        w: torch.Tensor,  # [N, w_dim]
        noise: torch.Tensor | None = None,  # unit noise [N or 1, 1, res, res]; None = no noise
        gain: float = 1.0,  # extra gain (sqrt(0.5) on the resnet blocks' conv1)
    ) -> torch.Tensor:
        in_res = self.resolution // self.up
        assert x.shape[1:] == (self.in_channels, in_res, in_res), (
            f"expected [N, {self.in_channels}, {in_res}, {in_res}], got {tuple(x.shape)}"
        )
        styles = self.affine(w)
        scaled_noise = None
        if noise is not None and self.use_noise:
            assert noise.shape[-2:] == (self.resolution, self.resolution), (
                f"noise must be [N, 1, {self.resolution}, {self.resolution}]"
            )
            scaled_noise = noise * self.noise_strength
        weight = self.weight if self.weight_gain == 1 else self.weight * self.weight_gain
        x = modulated_conv2d(
            x,
            weight,
            styles,
            noise=scaled_noise,
            up=self.up,
            padding=self.padding,
            resample_filter=self.resample_filter,
            flip_weight=(self.up == 1),
            fused_modconv=self.fused_modconv,
        )
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, self.activation, gain=self.act_gain * gain, clamp=act_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation, + bias (+ clamp)."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # image channels
        w_dim: int,  # style vector size
        kernel_size: int = 1,  # conv kernel side
        conv_clamp: float | None = None,  # clamp the output to +-X, None = no clamp
        gain_on_weight: bool = False,  # apply 1/sqrt(fan_in) to the weight (rosinality) rather
        # than to the styles (NVIDIA): the same product, rounded differently
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.conv_clamp = conv_clamp
        self.gain_on_weight = gain_on_weight
        self.fused_modconv = False  # see SynthesisNetwork.set_fused_modconv
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.gain_on_weight:
            weight, styles = self.weight * self.weight_gain, self.affine(w)
        else:
            weight, styles = self.weight, self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, weight, styles, demodulate=False, fused_modconv=self.fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class Conv2dLayer(nn.Module):
    """Plain equalised conv (the resnet blocks' 1x1 upsampling skip)."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        kernel_size: int,  # conv kernel side
        bias: bool = True,  # add a bias
        activation: str = "linear",  # after the bias
        up: int = 1,  # upsampling factor
        resample_filter: Sequence[float] = (1, 3, 3, 1),  # FIR taps for upsampling
        conv_clamp: float | None = None,  # clamp the output to +-X, None = no clamp
    ) -> None:
        super().__init__()
        _, self.act_gain = _activation(activation)
        self.activation = activation
        self.up = up
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight * self.weight_gain
        x = conv2d_resample(
            x, w, self.resample_filter, self.up, self.padding, flip_weight=(self.up == 1)
        )
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, self.activation, gain=self.act_gain * gain, clamp=act_clamp)


# ----------------------------------------------------------------------------


class SynthesisBlock(nn.Module):
    """One resolution: [const | conv0 (x2 up)], conv1, [toRGB]; skip images are upsampled."""

    def __init__(
        self,
        in_channels: int,  # input feature maps, 0 = the first (4x4) block with a learned const
        out_channels: int,  # output feature maps
        w_dim: int,  # style vector size
        resolution: int,  # side of this block's output
        img_channels: int,  # image channels
        is_last: bool,  # the last block always has a toRGB
        architecture: str = "skip",  # 'orig' | 'skip' | 'resnet'
        resample_filter: Sequence[float] = (1, 3, 3, 1),  # FIR taps for upsampling
        conv_clamp: float | None = None,  # clamp conv outputs to +-X, None = no clamp
        conv_weight_gain: Callable[[int], float] | None = None,  # fan_in -> SynthesisLayer
        # weight_gain (None = 1, NVIDIA's)
        torgb_gain_on_weight: bool = False,  # see ToRGBLayer
        **layer_kwargs: Any,  # kernel_size, use_noise, activation for SynthesisLayer
    ) -> None:
        super().__init__()
        if architecture not in ("orig", "skip", "resnet"):
            raise ModelFileError(f"unknown StyleGAN2 architecture {architecture!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        kernel = int(layer_kwargs.get("kernel_size", 3))

        def gain(fan_in_channels: int) -> float:
            return (
                1.0 if conv_weight_gain is None else conv_weight_gain(fan_in_channels * kernel**2)
            )

        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels,
                out_channels,
                w_dim=w_dim,
                resolution=resolution,
                up=2,
                resample_filter=resample_filter,
                conv_clamp=conv_clamp,
                weight_gain=gain(in_channels),
                **layer_kwargs,
            )
            self.num_conv += 1
        self.conv1 = SynthesisLayer(
            out_channels,
            out_channels,
            w_dim=w_dim,
            resolution=resolution,
            resample_filter=resample_filter,
            conv_clamp=conv_clamp,
            weight_gain=gain(out_channels),
            **layer_kwargs,
        )
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(
                out_channels,
                img_channels,
                w_dim=w_dim,
                conv_clamp=conv_clamp,
                gain_on_weight=torgb_gain_on_weight,
            )
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(
                in_channels,
                out_channels,
                kernel_size=1,
                bias=False,
                up=2,
                resample_filter=resample_filter,
            )

    def layers(self) -> list[SynthesisLayer]:
        """The block's synthesis layers in the order they consume styles and noise."""
        return [self.conv0, self.conv1] if self.in_channels else [self.conv1]

    def forward(
        self,
        x: torch.Tensor | None,  # [N, in_channels, res/2, res/2], None for the first block
        img: torch.Tensor | None,  # [N, img_channels, res/2, res/2] skip image, or None
        ws: torch.Tensor,  # [N, num_conv + num_torgb, w_dim]
        noise: Sequence[torch.Tensor | None],  # one per layer of this block
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert ws.shape[1:] == (self.num_conv + self.num_torgb, self.w_dim), (
            f"block {self.resolution}: ws {tuple(ws.shape)}"
        )
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), noise[0])
        else:
            assert x is not None
            half = self.resolution // 2
            assert x.shape[1:] == (self.in_channels, half, half), f"got {tuple(x.shape)}"
            if self.architecture == "resnet":
                y = self.skip(x, gain=math.sqrt(0.5))
                x = self.conv0(x, next(w_iter), noise[0])
                x = self.conv1(x, next(w_iter), noise[1], gain=math.sqrt(0.5))
                x = y + x
            else:
                x = self.conv0(x, next(w_iter), noise[0])
                x = self.conv1(x, next(w_iter), noise[1])
        if img is not None:
            half = self.resolution // 2
            assert img.shape[1:] == (self.img_channels, half, half), f"got {tuple(img.shape)}"
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter))
            img = img + y if img is not None else y
        return x, img


def channels_for(
    resolution: int, channel_base: int = 32768, channel_max: int = 512
) -> dict[int, int]:
    """NVIDIA's channel rule: min(channel_base // res, channel_max) per block resolution."""
    return {2**i: min(channel_base // 2**i, channel_max) for i in range(2, resolution.bit_length())}


class SynthesisNetwork(nn.Module):
    """W+ [N, num_ws, w_dim] (+ noise maps) -> image [N, img_channels, R, R], about [-1, 1]."""

    def __init__(
        self,
        w_dim: int,  # style vector size
        img_resolution: int,  # output side, a power of two >= 4
        img_channels: int,  # image channels
        channels: Mapping[int, int] | None = None,  # block resolution -> feature maps;
        # None = NVIDIA's rule with channel_base / channel_max
        channel_base: int = 32768,  # NVIDIA's overall channel multiplier (16384 in some configs)
        channel_max: int = 512,  # most feature maps in a block
        **block_kwargs: Any,  # architecture, resample_filter, conv_clamp, ... for the blocks
    ) -> None:
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ModelFileError(
                f"StyleGAN2 resolution must be a power of two >= 4, got {img_resolution}"
            )
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(2, img_resolution.bit_length())]
        chans = (
            dict(channels) if channels else channels_for(img_resolution, channel_base, channel_max)
        )
        missing = [r for r in self.block_resolutions if r not in chans]
        if missing:
            raise ModelFileError(f"no channel count for block resolutions {missing}")
        self.channels = {r: int(chans[r]) for r in self.block_resolutions}
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(
                self.channels[res // 2] if res > 4 else 0,
                self.channels[res],
                w_dim=w_dim,
                resolution=res,
                img_channels=img_channels,
                is_last=(res == img_resolution),
                **block_kwargs,
            )
            self.num_ws += block.num_conv
            if res == img_resolution:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def layers(self) -> list[SynthesisLayer]:
        """Every synthesis layer in style/noise order (b4.conv1, b8.conv0, b8.conv1, ...)."""
        return [layer for block in self.blocks() for layer in block.layers()]

    def set_fused_modconv(self, fused: bool) -> None:
        """How modulated convs run; the same math either way (NVIDIA's code has both paths).

        False (the default): scale the activations by the styles, run one shared-weight conv,
        scale by the demodulation coefficients (NVIDIA's training path). True: one grouped conv
        with per-sample modulated weights (the originals' inference path). With gradients
        w.r.t. W, as in PULSE, the shared-weight form is ~10x faster on CPUs (torch falls
        back to a slow kernel for grouped convs whose weight needs a gradient).
        """
        for m in self.modules():
            if isinstance(m, (SynthesisLayer, ToRGBLayer)):
                m.fused_modconv = fused

    def forward(
        self,
        ws: torch.Tensor,  # [N, num_ws, w_dim]
        noise: Sequence[torch.Tensor | None] | None = None,  # one unit-noise map per layer
        # that has a noise input ([N or 1, 1, r, r]); None = no noise ('none' noise mode)
        edit: FeatureEdit | None = None,  # applied to each block's features x (not its skip
        # image), by the block's name "b{res}"; None = the plain network
        checkpoint: bool = False,  # activation checkpointing per block (base.run_segment)
    ) -> torch.Tensor:
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), (
            f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}"
        )
        ws = ws.to(torch.float32)
        layers = self.layers()
        noisy = [layer for layer in layers if layer.use_noise]
        if noise is not None and len(noise) != len(noisy):
            raise ValueError(f"expected {len(noisy)} noise maps, got {len(noise)}")
        by_layer: dict[int, torch.Tensor | None] = {id(layer): None for layer in layers}
        if noise is not None:
            by_layer.update({id(layer): n for layer, n in zip(noisy, noise, strict=True)})
        x = img = None
        w_idx = 0
        for block in self.blocks():
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            block_noise = [by_layer[id(layer)] for layer in block.layers()]
            x, img = run_segment(block, x, img, block_ws, block_noise, checkpoint=checkpoint)
            if edit is not None:
                x = edit(f"b{block.resolution}", x)
            w_idx += block.num_conv
        assert img is not None
        return img


# ----------------------------------------------------------------------------


class StyleGAN2Generator(StyleGenerator):
    """NVIDIA's StyleGAN2 generator (`mapping` + `synthesis`) behind PULSE's protocol.

    `prior` maps the search's latent [B, num_ws, w_dim] to W+ through the Gaussian fit of the
    mapping network (`set_gaussian_fit` / `ensure_gaussian_fit`); `synthesize` takes one unit
    noise map per noisy synthesis layer (`noise_shapes`: 2 per block, 1 in the 4x4 block).
    """

    family = "stylegan2"

    def __init__(
        self,
        mapping: MappingNetwork,
        synthesis: SynthesisNetwork,
        fit: GaussianFit | None = None,  # the W fit; None until computed or loaded
    ) -> None:
        super().__init__()
        if synthesis.img_channels != 3:
            raise ModelFileError(
                f"PULSE restores RGB images; this generator has {synthesis.img_channels} channels"
            )
        if mapping.w_dim != synthesis.w_dim or mapping.num_ws != synthesis.num_ws:
            raise ModelFileError("mapping and synthesis networks do not fit together")
        self.mapping = mapping
        self.synthesis = synthesis
        self.final_activation = FinalActivation(*_activation(mapping.activation))
        self._init_fit(fit, persistent=False)  # state_dict() keys stay exactly NVIDIA's

    # -- construction from NVIDIA's init kwargs -------------------------------------------------

    @classmethod
    def from_init_kwargs(
        cls,
        init_kwargs: Mapping[str, Any],  # G_ema's constructor arguments (see module doc)
        state_dict: Mapping[str, torch.Tensor] | None = None,  # NVIDIA-named tensors to load
    ) -> StyleGAN2Generator:
        """Build from `Generator(**init_kwargs)`'s arguments, then load `state_dict` strictly."""
        mapping_kwargs, synthesis_kwargs, dims = _split_init_kwargs(init_kwargs)
        synthesis = SynthesisNetwork(
            w_dim=dims["w_dim"],
            img_resolution=dims["img_resolution"],
            img_channels=dims["img_channels"],
            **synthesis_kwargs,
        )
        mapping = MappingNetwork(
            z_dim=dims["z_dim"], w_dim=dims["w_dim"], num_ws=synthesis.num_ws, **mapping_kwargs
        )
        gen = cls(mapping, synthesis)
        if state_dict is not None:
            gen.load_network_state(state_dict, source="network pickle")
        return gen

    def load_network_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy every tensor in; refuse missing, unexpected or mis-shaped ones (a ModelFileError
        that lists them), so no tensor of the file or of the network is silently skipped."""
        check_coverage(self.state_dict(), state, source)
        self.load_state_dict(dict(state), strict=True)

    # -- the PULSE protocol ---------------------------------------------------------------------

    @property
    def noise_shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple((m.resolution, m.resolution) for m in self.synthesis.layers() if m.use_noise)

    def feature_layers(self) -> dict[str, int]:
        """Each synthesis block's feature output (its (x, img) tuple's x): b4 ... bR."""
        return {f"b{res}": res for res in self.synthesis.block_resolutions}

    def synthesize(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        return self.synthesis(w, noise if self.noise_shapes else None, edit)

    supports_checkpoint = True

    def synthesize_checkpointed(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        return self.synthesis(w, noise if self.noise_shapes else None, edit, checkpoint=True)

    # -- conveniences ---------------------------------------------------------------------------

    def mapping_ws(
        self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> torch.Tensor:
        """z [N, z_dim] -> W+ [N, num_ws, w_dim], optionally truncated towards `w_avg`."""
        w = self.mapping(z).unsqueeze(1).repeat(1, self.num_latents, 1)
        if truncation_psi != 1:
            w_avg = self.mapping.w_avg
            if w_avg is None:
                raise ModelFileError(f"{self.model_id} has no w_avg: truncation is unavailable")
            cut = self.num_latents if truncation_cutoff is None else truncation_cutoff
            w[:, :cut] = w_avg.lerp(w[:, :cut], truncation_psi)
        return w

    def const_noise(self) -> list[torch.Tensor]:
        """The stored `noise_const` maps as [1, 1, r, r] (NVIDIA's noise_mode='const')."""
        return [m.noise_const[None, None] for m in self.synthesis.layers() if m.use_noise]


# ----------------------------------------------------------------------------
# NVIDIA's init kwargs -> our constructors, refusing what we do not implement.

_GENERATOR_KEYS = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"}
_MAPPING_KEYS = {
    "num_layers",
    "embed_features",
    "layer_features",
    "activation",
    "lr_multiplier",
    "w_avg_beta",
    "freeze_layers",  # only changes which tensors train (parameters vs buffers)
    "freeze_embed",
}
_SYNTHESIS_KEYS = {"channel_base", "channel_max", "architecture", "resample_filter", "conv_clamp"}
_LAYER_KEYS = {"kernel_size", "use_noise", "activation"}
# Performance or training switches with no effect on the float32 forward pass.
_IGNORED_KEYS = {
    "num_fp16_res",
    "fp16_channels_last",
    "channels_last",
    "fused_modconv_default",
}


def _split_init_kwargs(
    init_kwargs: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """(mapping kwargs, synthesis kwargs, dims) from G_ema's init kwargs.

    stylegan2-ada-pytorch nests the synthesis options in `synthesis_kwargs`; the stylegan3
    repository (and legacy.py's TF conversion there) passes them as top-level keywords.
    """
    kwargs = dict(init_kwargs)
    missing = [k for k in ("z_dim", "w_dim", "img_resolution") if k not in kwargs]
    if missing:
        raise ModelFileError(f"StyleGAN2 generator arguments lack {missing}")
    c_dim = int(kwargs.get("c_dim", 0) or 0)
    if c_dim > 0:
        raise ModelFileError(
            f"this is a class-conditional generator (c_dim={c_dim}); PULSE needs an "
            "unconditional one (c_dim=0)"
        )
    dims = {
        "z_dim": int(kwargs["z_dim"]),
        "w_dim": int(kwargs["w_dim"]),
        "img_resolution": int(kwargs["img_resolution"]),
        "img_channels": int(kwargs.get("img_channels", 3)),
    }
    mapping_in = dict(kwargs.get("mapping_kwargs") or {})
    synthesis_in = dict(kwargs.get("synthesis_kwargs") or {})
    for key, value in kwargs.items():
        if key not in _GENERATOR_KEYS | {"mapping_kwargs", "synthesis_kwargs"}:
            synthesis_in[key] = value
    unknown = sorted(set(mapping_in) - _MAPPING_KEYS)
    unknown += sorted(set(synthesis_in) - _SYNTHESIS_KEYS - _LAYER_KEYS - _IGNORED_KEYS)
    if unknown:
        raise ModelFileError(
            f"unsupported StyleGAN2 generator option(s) {unknown}: this network differs from "
            "NVIDIA's released architecture in ways this loader does not reproduce"
        )
    mapping = {
        "num_layers": int(mapping_in.get("num_layers", 8)),
        "layer_features": mapping_in.get("layer_features"),
        "activation": str(mapping_in.get("activation", "lrelu")),
        "lr_multiplier": float(mapping_in.get("lr_multiplier", 0.01)),
        # NVIDIA registers w_avg unless w_avg_beta is None (its default is a number).
        "track_w_avg": mapping_in.get("w_avg_beta", 0.995) is not None,
    }
    synthesis: dict[str, Any] = {
        "channel_base": int(synthesis_in.get("channel_base", 32768)),
        "channel_max": int(synthesis_in.get("channel_max", 512)),
        "architecture": str(synthesis_in.get("architecture", "skip")),
        "resample_filter": list(synthesis_in.get("resample_filter", [1, 3, 3, 1])),
        "conv_clamp": synthesis_in.get("conv_clamp"),
    }
    if synthesis["conv_clamp"] is not None:
        synthesis["conv_clamp"] = float(synthesis["conv_clamp"])
    for key in _LAYER_KEYS:
        if key in synthesis_in:
            synthesis[key] = synthesis_in[key]
    return mapping, synthesis, dims


def check_coverage(
    ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], source: str
) -> None:
    """Every tensor of the file has a place in our network and every one of ours is filled."""
    require_same_tensors(
        ours, theirs, f"the {source} does not match the StyleGAN2 architecture it declares"
    )
