"""StyleGAN3 (Karras et al., "Alias-Free Generative Adversarial Networks", 2021) in plain PyTorch.

Configurations T (3x3 convolutions, separable Kaiser filters) and R (1x1 convolutions, radially
symmetric jinc down-filters in the non-critically sampled layers), both inference only:

- the synthesis input is a bank of Fourier features whose frequencies and phases are rotated and
  translated by an affine of the first w, then mixed by a learned matrix;
- every layer is a modulated (and, except toRGB, demodulated) convolution scaled by the inverse
  square root of its recorded input magnitude, followed by the filtered leaky ReLU: bias, upsample
  with `up_filter`, leaky ReLU with gain sqrt(2) and clamp, downsample with `down_filter`;
- the layer schedule (cutoffs, stopbands, sampling rates, sizes, channels) is the paper's
  geometric progression, computed in float64 like NVIDIA's code;
- there are no noise inputs: different samples come from different starts only.

Module names, parameters and buffers mirror NVIDIA's `G_ema` (`mapping.fc0.weight`,
`synthesis.input.freqs`, `synthesis.L0_36_512.up_filter`, ...), so a release pickle's state_dict
loads strictly through `StyleGAN3Generator.from_init_kwargs`. The release's filters are stored
buffers, so loading never needs the filter design below (it only matters for new random networks).

Deliberate differences, all below float32 rounding: the layers NVIDIA runs in float16 on CUDA
(`use_fp16`) run in float32 here; the modulated convolution scales the input and the output
(NVIDIA's non-fused form) instead of building per-sample weights; and the style pre-normalisation
of a demodulated layer is per sample rather than over the whole batch (demodulation cancels that
scale exactly, up to its 1e-8 epsilon), so the rows of a batch never influence each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
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
from pulse_core.generators.fir import upfirdn2d
from pulse_core.generators.gaussian_fit import FIT_CHUNK, FIT_SAMPLES, NVIDIA_LRELU, GaussianFit

SQRT2 = math.sqrt(2.0)
Pad4 = tuple[int, int, int, int]

# ----------------------------------------------------------------------------
# Low-pass filter design (what `scipy.signal.firwin` with a Kaiser window and `scipy.special.j1`
# compute, restated in numpy: scipy is not a dependency).


def kaiser_atten(numtaps: int, width: float) -> float:
    """Stopband attenuation in dB of a Kaiser FIR filter; `width` is relative to Nyquist (0..1)."""
    return 2.285 * (numtaps - 1) * math.pi * width + 7.95


def kaiser_beta(atten: float) -> float:
    """Kaiser window beta for a stopband attenuation in dB (Kaiser's empirical formula)."""
    if atten > 50:
        return 0.1102 * (atten - 8.7)
    if atten > 21:
        return 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21)
    return 0.0


def firwin_kaiser(numtaps: int, cutoff: float, width: float, fs: float) -> np.ndarray:
    """Windowed-sinc low-pass, float64, as `scipy.signal.firwin(numtaps, cutoff, width=w, fs=fs)`.

    cutoff and width are in the units of fs. The ideal low-pass impulse response is sampled
    symmetrically around the centre, multiplied by a symmetric Kaiser window whose beta comes from
    the transition width, and scaled to unit gain at DC.
    """
    nyquist = 0.5 * fs
    c = cutoff / nyquist
    beta = kaiser_beta(kaiser_atten(numtaps, width / nyquist))
    m = np.arange(numtaps, dtype=np.float64) - 0.5 * (numtaps - 1)
    h = c * np.sinc(c * m) * np.kaiser(numtaps, beta)
    return h / h.sum()


def bessel_j1(x: np.ndarray) -> np.ndarray:
    """Bessel function of the first kind of order 1, float64, to ~1e-15.

    Bessel's integral J1(x) = 1/pi * int_0^pi cos(t - x sin t) dt; its integrand is periodic and
    analytic, so the trapezoidal rule converges exponentially once it has more points than |x|.
    """
    x = np.asarray(x, dtype=np.float64)
    n = int(np.abs(x).max(initial=0.0)) + 64
    t = np.linspace(0.0, math.pi, n + 1)
    weights = np.ones(n + 1)
    weights[0] = weights[-1] = 0.5
    return np.cos(t - np.multiply.outer(x, np.sin(t))) @ weights / n


def jinc_lowpass(numtaps: int, cutoff: float, width: float, fs: float) -> np.ndarray:
    """Radially symmetric (numtaps, numtaps) low-pass: jinc times an outer Kaiser window, sum 1."""
    x = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    r = np.hypot(*np.meshgrid(x, x))
    with np.errstate(divide="ignore", invalid="ignore"):
        f = bessel_j1(2 * cutoff * (np.pi * r)) / (np.pi * r)
    f[r == 0] = cutoff  # the limit at the centre (only reachable with an odd number of taps)
    beta = kaiser_beta(kaiser_atten(numtaps, width / (fs / 2)))
    window = np.kaiser(numtaps, beta)
    f = f * np.outer(window, window)
    return f / f.sum()


def design_lowpass_filter(
    numtaps: int, cutoff: float, width: float, fs: float, radial: bool = False
) -> torch.Tensor | None:
    """A layer's up/down filter as NVIDIA's networks store it: None (identity) for one tap, a
    (numtaps,) separable Kaiser filter, or a (numtaps, numtaps) radial jinc filter; float32."""
    assert numtaps >= 1
    if numtaps == 1:
        return None
    f = (
        jinc_lowpass(numtaps, cutoff, width, fs)
        if radial
        else firwin_kaiser(numtaps, cutoff, width, fs)
    )
    return torch.as_tensor(f, dtype=torch.float32)


# ----------------------------------------------------------------------------
# The filtered nonlinearity (the math of NVIDIA's `_filtered_lrelu_ref`, on the shared FIR
# resampling of fir.py).


def filtered_lrelu(
    x: torch.Tensor,  # (N, C, H, W)
    fu: torch.Tensor | None,  # upsampling filter, None = identity
    fd: torch.Tensor | None,  # downsampling filter, None = identity
    b: torch.Tensor | None = None,  # (C,) bias added before upsampling; None = no bias
    up: int = 1,  # upsampling factor
    down: int = 1,  # downsampling factor
    padding: Pad4 = (0, 0, 0, 0),  # (x0, x1, y0, y1) of the upsampled image
    gain: float = SQRT2,  # applied after the leaky ReLU (1 for toRGB)
    slope: float = 0.2,  # negative slope (1 = linear, for toRGB)
    clamp: float | None = None,  # clamp to [-clamp, clamp] after the gain; None = no clamp
) -> torch.Tensor:
    """Bias, upsample with fu, leaky ReLU * gain, clamp, downsample with fd (`_filtered_lrelu_ref`).

    The gain is moved past the clamp into the (linear) downsampling filter:
    clamp(g * lrelu(x), c) = g * clamp(lrelu(x), c / g); one full-resolution pass fewer.
    """
    if b is not None:
        x = x + b.to(x.dtype).view(1, -1, 1, 1)
    x = upfirdn2d(x, fu, up=up, padding=padding, gain=up**2)
    if slope != 1:
        x = F.leaky_relu(x, slope)
    if clamp is not None:
        x = x.clamp(-clamp / gain, clamp / gain)
    return upfirdn2d(x, fd, down=down, gain=gain)


def modulated_conv2d(
    x: torch.Tensor,  # (N, I, H, W)
    weight: torch.Tensor,  # (O, I, k, k)
    styles: torch.Tensor,  # (N, I)
    demodulate: bool = True,  # normalise each output channel's modulated weights (not for toRGB)
    padding: int = 0,  # k - 1 in StyleGAN3: every layer grows its input by k - 1 pixels
    input_gain: torch.Tensor | None = None,  # scalar or (I,) factor on the input channels
    bias: torch.Tensor | None = None,  # (O,) added to the result (fused with demodulation)
) -> torch.Tensor:
    """StyleGAN2/3 modulated convolution, written as input scaling -> shared conv -> output scaling.

    Same value as scaling the weights per sample: conv(x * s, w) * d = conv(x, w * s * d).
    """
    n, in_ch = x.shape[:2]
    assert weight.shape[1] == in_ch and styles.shape == (n, in_ch)
    if demodulate:
        # Pre-normalisation (NVIDIA's guard against float16 overflow); cancelled by demodulation.
        weight = weight * weight.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
        styles = styles * styles.square().mean(dim=1, keepdim=True).rsqrt()
    scale = styles if input_gain is None else styles * input_gain
    x = F.conv2d(x * scale.to(x.dtype)[:, :, None, None], weight.to(x.dtype), padding=padding)
    b = None if bias is None else bias.to(x.dtype).view(1, -1, 1, 1)
    if demodulate:
        # 1 / |w * s| per (sample, output channel): sum over (in, kh, kw) of w^2 s^2
        dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()
        dcoefs = dcoefs.to(x.dtype)[:, :, None, None]
        return x * dcoefs if b is None else torch.addcmul(b, x, dcoefs)
    return x if b is None else x + b


# ----------------------------------------------------------------------------


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalised learning rate; 'lrelu' is leaky ReLU(0.2) times sqrt(2)."""

    def __init__(
        self,
        in_features: int,  # fan-in
        out_features: int,  # outputs
        activation: str = "linear",  # 'linear' or 'lrelu' (slope 0.2, gain sqrt(2))
        lr_multiplier: float = 1.0,  # 0.01 in the mapping network
        weight_init: float = 1.0,  # std of the initial weights (0 for the input's affine)
        bias_init: float | list[float] = 0.0,  # initial bias: scalar or one per output
    ) -> None:
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"unsupported activation {activation!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.weight = nn.Parameter(
            torch.randn(out_features, in_features) * (weight_init / lr_multiplier)
        )
        bias = torch.as_tensor(bias_init, dtype=torch.float32).broadcast_to(out_features)
        self.bias = nn.Parameter(bias / lr_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype)
        if self.bias_gain != 1:
            b = b * self.bias_gain
        x = F.linear(x, w, b)
        if self.activation == "lrelu":
            x = F.leaky_relu(x, 0.2) * SQRT2
        return x


# ----------------------------------------------------------------------------


class StyleGAN3Mapping(nn.Module):
    """z -> w: normalise z's second moment, then `num_layers` x [dense (lr 0.01), lrelu * sqrt(2)].

    The last layer has the activation too, so every w is sqrt(2) * LeakyReLU_0.2(pre-activation).
    """

    def __init__(
        self,
        z_dim: int,  # size of z
        w_dim: int,  # size of w
        num_ws: int,  # copies of w handed to the synthesis network (num_layers + 2)
        num_layers: int = 2,  # dense layers (2 in configs T and R)
        lr_multiplier: float = 0.01,  # learning-rate multiplier of the dense layers
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        features = [z_dim] + [w_dim] * num_layers
        for i in range(num_layers):
            layer = FullyConnectedLayer(
                features[i], features[i + 1], activation="lrelu", lr_multiplier=lr_multiplier
            )
            setattr(self, f"fc{i}", layer)
        self.register_buffer("w_avg", torch.zeros(w_dim))  # mean w, for truncation only

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """One w per z: (N, z_dim) -> (N, w_dim)."""
        assert z.ndim == 2 and z.shape[1] == self.z_dim, f"z must be (N, {self.z_dim})"
        x = z.to(torch.float32)
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return x

    def forward(
        self,
        z: torch.Tensor,  # (N, z_dim)
        truncation_psi: float = 1.0,  # 1 = no truncation; < 1 pulls w towards w_avg
        truncation_cutoff: int | None = None,  # truncate only the first k ws; None = all
    ) -> torch.Tensor:
        """(N, num_ws, w_dim): w broadcast to every layer, optionally truncated."""
        x = self.features(z).unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            k = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x[:, :k] = self.w_avg.lerp(x[:, :k], truncation_psi)
        return x


# ----------------------------------------------------------------------------


class SynthesisInput(nn.Module):
    """Fourier features: sin(2 pi (f . xy + phase)), rotated/translated by an affine of w[0]."""

    def __init__(
        self,
        w_dim: int,  # size of w
        channels: int,  # number of Fourier features (= channels of the first layer)
        size: int,  # side of the output grid in pixels (sampling rate + 2 * margin)
        sampling_rate: float,  # samples per unit length of the grid
        bandwidth: float,  # radius of the frequency disc (the first cutoff)
    ) -> None:
        super().__init__()
        self.w_dim = w_dim
        self.channels = channels
        self.size = int(size)
        self.sampling_rate = sampling_rate
        self.bandwidth = bandwidth

        # Frequencies drawn in a disc of radius `bandwidth`, phases uniform in [-1/2, 1/2).
        freqs = torch.randn(channels, 2)
        radii = freqs.square().sum(dim=1, keepdim=True).sqrt()
        freqs /= radii * radii.square().exp().pow(0.25)
        freqs *= bandwidth
        phases = torch.rand(channels) - 0.5

        self.weight = nn.Parameter(torch.randn(channels, channels))  # mixes the features
        # (cos, sin, tx, ty) of the rotation and translation; identity at initialisation
        self.affine = FullyConnectedLayer(w_dim, 4, weight_init=0.0, bias_init=[1.0, 0.0, 0.0, 0.0])
        self.register_buffer("transform", torch.eye(3))  # user transform (inverse, image space)
        self.register_buffer("freqs", freqs)  # (channels, 2) as (x, y)
        self.register_buffer("phases", phases)  # (channels,)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        assert w.ndim == 2 and w.shape[1] == self.w_dim, f"w must be (N, {self.w_dim})"
        n = w.shape[0]
        t = self.affine(w)
        t = t / t[:, :2].norm(dim=1, keepdim=True)  # unit rotation (r_c, r_s) and (t_x, t_y)
        eye = torch.eye(3, device=w.device, dtype=t.dtype)
        rot = eye.repeat(n, 1, 1)  # inverse rotation of the image
        rot[:, 0, 0] = t[:, 0]
        rot[:, 0, 1] = -t[:, 1]
        rot[:, 1, 0] = t[:, 1]
        rot[:, 1, 1] = t[:, 0]
        shift = eye.repeat(n, 1, 1)  # inverse translation of the image
        shift[:, 0, 2] = -t[:, 2]
        shift[:, 1, 2] = -t[:, 3]
        transforms = rot @ shift @ self.transform.unsqueeze(0)

        freqs = self.freqs.unsqueeze(0)  # (1, C, 2)
        phases = self.phases.unsqueeze(0) + (freqs @ transforms[:, :2, 2:]).squeeze(2)  # (N, C)
        freqs = freqs @ transforms[:, :2, :2]  # (N, C, 2)
        # damp frequencies a user transform pushes beyond the band the grid can hold
        amplitudes = (
            1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)
        ).clamp(0, 1)

        # pixel centres in units of the sampling period, centred on the grid
        theta = torch.eye(2, 3, device=w.device)
        theta[0, 0] = 0.5 * self.size / self.sampling_rate
        theta[1, 1] = 0.5 * self.size / self.sampling_rate
        grid = F.affine_grid(theta[None], [1, 1, self.size, self.size], align_corners=False)

        x = (grid.unsqueeze(3) @ freqs.permute(0, 2, 1)[:, None, None]).squeeze(3)  # (N, H, W, C)
        x = x + phases[:, None, None]
        x = torch.sin(x * (2 * math.pi)) * amplitudes[:, None, None]
        x = x @ (self.weight / math.sqrt(self.channels)).t()
        x = x.permute(0, 3, 1, 2)
        assert x.shape == (n, self.channels, self.size, self.size)
        return x


# ----------------------------------------------------------------------------


class SynthesisLayer(nn.Module):
    """Modulated conv (k x k, k - 1 pixels of growth) + filtered leaky ReLU; or the final toRGB."""

    def __init__(
        self,
        w_dim: int,  # size of w
        is_torgb: bool,  # the last layer: 1x1 conv, no demodulation, linear, no filters
        is_critically_sampled: bool,  # cutoff at Nyquist: never a radial filter
        use_fp16: bool,  # NVIDIA runs this layer in float16 on CUDA; recorded, we use float32
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps (img_channels for toRGB)
        in_size: int,  # input side in pixels
        out_size: int,  # output side in pixels
        in_sampling_rate: int,  # input samples per unit length
        out_sampling_rate: int,  # output samples per unit length
        in_cutoff: float,  # input cutoff frequency f_c
        out_cutoff: float,  # output cutoff frequency f_c
        in_half_width: float,  # input transition band half-width f_h
        out_half_width: float,  # output transition band half-width f_h
        conv_kernel: int = 3,  # 3 for config T, 1 for config R; toRGB always uses 1
        filter_size: int = 6,  # filter taps per unit of the lower of the two sampling rates
        lrelu_upsampling: int = 2,  # the nonlinearity runs at this times the higher rate
        use_radial_filters: bool = False,  # radial down-filter unless critically sampled (R)
        conv_clamp: float | None = 256,  # clamp after the nonlinearity; None = no clamp
        magnitude_ema_beta: float = 0.999,  # training-time EMA decay of the input magnitude; unused
    ) -> None:
        super().__init__()
        self.w_dim = w_dim
        self.is_torgb = is_torgb
        self.is_critically_sampled = is_critically_sampled
        self.use_fp16 = use_fp16
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_size = int(in_size)
        self.out_size = int(out_size)
        self.in_sampling_rate = in_sampling_rate
        self.out_sampling_rate = out_sampling_rate
        self.tmp_sampling_rate = max(in_sampling_rate, out_sampling_rate) * (
            1 if is_torgb else lrelu_upsampling
        )
        self.in_cutoff = in_cutoff
        self.out_cutoff = out_cutoff
        self.in_half_width = in_half_width
        self.out_half_width = out_half_width
        self.conv_kernel = 1 if is_torgb else conv_kernel
        self.conv_clamp = conv_clamp
        self.magnitude_ema_beta = magnitude_ema_beta

        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)  # w -> styles
        k = self.conv_kernel
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, k, k))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("magnitude_ema", torch.ones([]))  # mean square of the input

        # Upsampling filter: from the input rate to the nonlinearity's rate.
        self.up_factor = int(np.rint(self.tmp_sampling_rate / in_sampling_rate))
        assert in_sampling_rate * self.up_factor == self.tmp_sampling_rate
        self.up_taps = filter_size * self.up_factor if self.up_factor > 1 and not is_torgb else 1
        self.register_buffer(
            "up_filter",
            design_lowpass_filter(
                self.up_taps, in_cutoff, in_half_width * 2, self.tmp_sampling_rate
            ),
        )
        # Downsampling filter: from the nonlinearity's rate to the output rate.
        self.down_factor = int(np.rint(self.tmp_sampling_rate / out_sampling_rate))
        assert out_sampling_rate * self.down_factor == self.tmp_sampling_rate
        self.down_taps = (
            filter_size * self.down_factor if self.down_factor > 1 and not is_torgb else 1
        )
        self.down_radial = use_radial_filters and not is_critically_sampled
        self.register_buffer(
            "down_filter",
            design_lowpass_filter(
                self.down_taps,
                out_cutoff,
                out_half_width * 2,
                self.tmp_sampling_rate,
                radial=self.down_radial,
            ),
        )

        # Padding of the upsampled image so the output has out_size pixels, with the sample
        # positions shifted for the symmetric interpretation of the grid (paper, appendix C.3).
        pad_total = (self.out_size - 1) * self.down_factor + 1
        pad_total -= (self.in_size + self.conv_kernel - 1) * self.up_factor
        pad_total += self.up_taps + self.down_taps - 2
        pad_lo = (pad_total + self.up_factor) // 2
        pad_hi = pad_total - pad_lo
        self.padding = (pad_lo, pad_hi, pad_lo, pad_hi)  # (x0, x1, y0, y1)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        assert x.shape == (n, self.in_channels, self.in_size, self.in_size), "bad input shape"
        assert w.shape == (n, self.w_dim), "bad w shape"
        styles = self.affine(w)
        if self.is_torgb:
            styles = styles * (1 / math.sqrt(self.in_channels * self.conv_kernel**2))
        x = modulated_conv2d(
            x.to(torch.float32),
            self.weight,
            styles,
            demodulate=not self.is_torgb,
            padding=self.conv_kernel - 1,
            input_gain=self.magnitude_ema.rsqrt(),
            bias=self.bias,  # filtered_lrelu's first step, fused with the demodulation here
        )
        x = filtered_lrelu(
            x,
            self.up_filter,
            self.down_filter,
            None,
            up=self.up_factor,
            down=self.down_factor,
            padding=self.padding,
            gain=1.0 if self.is_torgb else SQRT2,
            slope=1.0 if self.is_torgb else 0.2,
            clamp=self.conv_clamp,
        )
        assert x.shape == (n, self.out_channels, self.out_size, self.out_size)
        return x


# ----------------------------------------------------------------------------


def layer_schedule(
    img_resolution: int,
    img_channels: int = 3,
    channel_base: int = 32768,
    channel_max: int = 512,
    num_layers: int = 14,
    num_critical: int = 2,
    first_cutoff: float = 2,
    first_stopband: float = 2**2.1,
    last_stopband_rel: float = 2**0.3,
    margin_size: int = 10,
) -> dict[str, np.ndarray]:
    """Per-layer cutoffs, stopbands, sampling rates, half-widths, sizes and channels (float64).

    Each array has num_layers + 1 entries: entry i describes the output of layer L{i} (entry 0
    also the Fourier input), so layer i reads entry max(i - 1, 0) and writes entry i. Cutoffs and
    stopbands grow geometrically from the first values to resolution / 2 (reached num_critical
    layers before the end); the sampling rate is the power of two that holds twice the stopband
    (at most the resolution).
    """
    if num_layers <= num_critical:
        raise ValueError(f"num_layers ({num_layers}) must exceed num_critical ({num_critical})")
    last_cutoff = img_resolution / 2
    last_stopband = last_cutoff * last_stopband_rel
    exponents = np.minimum(np.arange(num_layers + 1) / (num_layers - num_critical), 1)
    cutoffs = first_cutoff * (last_cutoff / first_cutoff) ** exponents
    stopbands = first_stopband * (last_stopband / first_stopband) ** exponents
    sampling_rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, img_resolution))))
    half_widths = np.maximum(stopbands, sampling_rates / 2) - cutoffs
    sizes = sampling_rates + margin_size * 2
    sizes[-2:] = img_resolution
    channels = np.rint(np.minimum((channel_base / 2) / cutoffs, channel_max))
    channels[-1] = img_channels
    return {
        "cutoffs": cutoffs,
        "stopbands": stopbands,
        "sampling_rates": sampling_rates,
        "half_widths": half_widths,
        "sizes": sizes,
        "channels": channels,
    }


class StyleGAN3Synthesis(nn.Module):
    """ws (N, num_layers + 2, w_dim) -> image (N, img_channels, R, R), about [-1, 1]."""

    def __init__(
        self,
        w_dim: int,  # size of w
        img_resolution: int,  # output side in pixels
        img_channels: int = 3,  # output channels
        channel_base: int = 32768,  # channels = channel_base / 2 / cutoff (65536 for config R)
        channel_max: int = 512,  # at most this many channels (1024 for config R)
        num_layers: int = 14,  # layers excluding the Fourier input and toRGB
        num_critical: int = 2,  # critically sampled layers at the end
        first_cutoff: float = 2,  # cutoff of the first layer f_c,0
        first_stopband: float = 2**2.1,  # minimum stopband of the first layer f_t,0
        last_stopband_rel: float = 2**0.3,  # minimum stopband of the last layer, / its cutoff
        margin_size: int = 10,  # pixels computed beyond the image on each side
        output_scale: float = 0.25,  # the image is the toRGB output times this
        num_fp16_res: int = 4,  # NVIDIA's float16 layers (highest resolutions); we use float32
        **layer_kwargs: Any,  # conv_kernel, filter_size, lrelu_upsampling, use_radial_filters,
        # conv_clamp, magnitude_ema_beta: see SynthesisLayer
    ) -> None:
        super().__init__()
        self.w_dim = w_dim
        self.num_ws = num_layers + 2
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_layers = num_layers
        self.num_critical = num_critical
        self.margin_size = margin_size
        self.output_scale = output_scale
        self.num_fp16_res = num_fp16_res

        s = layer_schedule(
            img_resolution,
            img_channels,
            channel_base,
            channel_max,
            num_layers,
            num_critical,
            first_cutoff,
            first_stopband,
            last_stopband_rel,
            margin_size,
        )
        cutoffs, rates, half_widths = s["cutoffs"], s["sampling_rates"], s["half_widths"]
        sizes, channels = s["sizes"], s["channels"]

        self.input = SynthesisInput(
            w_dim=w_dim,
            channels=int(channels[0]),
            size=int(sizes[0]),
            sampling_rate=float(rates[0]),
            bandwidth=float(cutoffs[0]),
        )
        self.layer_names: list[str] = []
        for idx in range(num_layers + 1):
            prev = max(idx - 1, 0)
            layer = SynthesisLayer(
                w_dim=w_dim,
                is_torgb=idx == num_layers,
                is_critically_sampled=idx >= num_layers - num_critical,
                use_fp16=bool(rates[idx] * 2**num_fp16_res > img_resolution),
                in_channels=int(channels[prev]),
                out_channels=int(channels[idx]),
                in_size=int(sizes[prev]),
                out_size=int(sizes[idx]),
                in_sampling_rate=int(rates[prev]),
                out_sampling_rate=int(rates[idx]),
                in_cutoff=float(cutoffs[prev]),
                out_cutoff=float(cutoffs[idx]),
                in_half_width=float(half_widths[prev]),
                out_half_width=float(half_widths[idx]),
                **layer_kwargs,
            )
            name = f"L{idx}_{layer.out_size}_{layer.out_channels}"
            setattr(self, name, layer)
            self.layer_names.append(name)

    def layers(self) -> list[SynthesisLayer]:
        return [getattr(self, name) for name in self.layer_names]

    def feature_sides(self) -> dict[str, int]:
        """Side of each feature map `forward` hands to `edit`: "input", then every layer."""
        sides = {"input": self.input.size}
        sides.update({name: getattr(self, name).out_size for name in self.layer_names})
        return sides

    def forward(
        self,
        ws: torch.Tensor,  # (N, num_ws, w_dim)
        edit: FeatureEdit | None = None,  # applied to the input's and each layer's output, by
        # name ("input", "L0_36_512", ...); None = the plain network
        checkpoint: bool = False,  # activation checkpointing per layer (base.run_segment)
    ) -> torch.Tensor:
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), (
            f"ws must be (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}"
        )
        w_list = ws.to(torch.float32).unbind(dim=1)
        x = run_segment(self.input, w_list[0], checkpoint=checkpoint)
        if edit is not None:
            x = edit("input", x)
        for name, layer, w in zip(self.layer_names, self.layers(), w_list[1:], strict=True):
            x = run_segment(layer, x, w, checkpoint=checkpoint)
            if edit is not None:
                x = edit(name, x)
        if self.output_scale != 1:
            x = x * self.output_scale
        assert x.shape[1:] == (self.img_channels, self.img_resolution, self.img_resolution)
        return x.to(torch.float32)

    @torch.no_grad()
    def calibrate_magnitudes(self, ws: torch.Tensor) -> None:
        """Set each layer's magnitude_ema to the mean square of its input for these ws.

        What training's moving average converges to; used to give random networks sane signal
        levels. Trained networks carry their own values.
        """
        w_list = ws.to(torch.float32).unbind(dim=1)
        x = self.input(w_list[0])
        for layer, w in zip(self.layers(), w_list[1:], strict=True):
            layer.magnitude_ema.copy_(x.square().mean())
            x = layer(x, w)


# ----------------------------------------------------------------------------

_CONFIGS = {
    # NVIDIA's train.py: R doubles the channels, uses 1x1 convs and radial down-filters.
    "t": {},
    "r": {"conv_kernel": 1, "use_radial_filters": True},
}

_TOP_KEYS = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs"}
_MAPPING_KEYS = {"num_layers", "lr_multiplier"}
_MAPPING_IGNORED = {"w_avg_beta", "freeze_layers", "freeze_embed"}  # training only
_SYNTHESIS_KEYS = {
    "channel_base",
    "channel_max",
    "num_layers",
    "num_critical",
    "first_cutoff",
    "first_stopband",
    "last_stopband_rel",
    "margin_size",
    "output_scale",
    "num_fp16_res",
    "conv_kernel",
    "filter_size",
    "lrelu_upsampling",
    "use_radial_filters",
    "conv_clamp",
    "magnitude_ema_beta",
}


class StyleGAN3Generator(StyleGenerator):
    """Mapping + synthesis (no noise inputs) + the Gaussian fit of the mapping's pre-activations.

    PULSE searches W+ (one w per synthesis input, num_layers + 2 of them) through
    `prior(v) = sqrt(2) * LeakyReLU_0.2(v * std + mean)`, the mapping's own final activation.
    """

    family = "stylegan3"
    final_activation = NVIDIA_LRELU  # every mapping layer ends in 'lrelu' (slope 0.2, gain sqrt(2))

    def __init__(
        self,
        mapping: StyleGAN3Mapping,
        synthesis: StyleGAN3Synthesis,
        fit: GaussianFit | None,  # mean/std of the mapping's final pre-activation; None until
        # computed (`compute_gaussian_fit`) or loaded
        init_kwargs: Mapping[str, Any] | None = None,  # NVIDIA's G init kwargs, for reference
    ) -> None:
        super().__init__()
        self.synthesis = synthesis  # registered first: state_dict() in NVIDIA's key order
        self.mapping = mapping
        self.init_kwargs = dict(init_kwargs or {})
        self._init_fit(fit, persistent=False)  # state_dict() keys are exactly NVIDIA's G_ema keys

    # --- the Generator protocol -------------------------------------------------

    @property
    def noise_shapes(self) -> tuple[tuple[int, int], ...]:
        return ()  # StyleGAN3 has no noise inputs: samples differ by their starts only

    def feature_layers(self) -> dict[str, int]:
        """The synthesis input and each layer L0 ... L{n}: their output feature maps."""
        return self.synthesis.feature_sides()

    def map_to_w(self, z: torch.Tensor) -> torch.Tensor:
        """One w per z (the mapping's `features`, before broadcasting to every input)."""
        return self.mapping.features(z)

    def synthesize(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        if noise:
            raise ValueError(f"StyleGAN3 takes no noise maps, got {len(noise)}")
        return self.synthesis(w, edit)

    supports_checkpoint = True

    def synthesize_checkpointed(
        self, w: torch.Tensor, noise: list[torch.Tensor], edit: FeatureEdit | None = None
    ) -> torch.Tensor:
        if noise:
            raise ValueError(f"StyleGAN3 takes no noise maps, got {len(noise)}")
        return self.synthesis(w, edit, checkpoint=True)

    # --- conveniences -------------------------------------------------------------

    @property
    def config(self) -> str:
        """'r' for 1x1 convolutions with radial filters, else 't'."""
        first = self.synthesis.layers()[0]
        return "r" if first.conv_kernel == 1 and first.down_radial else "t"

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> torch.Tensor:
        """Image from z (N, z_dim), like NVIDIA's G(z, c=None)."""
        return self.synthesis(self.mapping(z, truncation_psi, truncation_cutoff))

    # --- construction ----------------------------------------------------------------

    @classmethod
    def build(cls, init_kwargs: Mapping[str, Any]) -> tuple[StyleGAN3Mapping, StyleGAN3Synthesis]:
        """Mapping and synthesis networks (random weights) for NVIDIA's G init kwargs.

        Reads z_dim, c_dim (must be 0), w_dim, img_resolution, img_channels, mapping_kwargs
        (num_layers, lr_multiplier; w_avg_beta ignored) and the synthesis kwargs at the top level
        (as NVIDIA's stylegan3 Generator stores them) or nested under `synthesis_kwargs`.
        Unknown keys are refused rather than guessed.
        """
        kwargs = dict(init_kwargs)
        kwargs.pop("class_name", None)
        nested = dict(kwargs.pop("synthesis_kwargs", None) or {})  # StyleGAN2-ADA-style nesting
        clash = set(nested) & set(kwargs)
        if clash:
            raise ModelFileError(f"StyleGAN3 init kwargs {sorted(clash)} given twice")
        kwargs.update(nested)
        missing = {"z_dim", "w_dim", "img_resolution", "img_channels"} - set(kwargs)
        if missing:
            raise ModelFileError(f"StyleGAN3 init kwargs lack {sorted(missing)}")
        if int(kwargs.get("c_dim", 0) or 0) > 0:
            raise ModelFileError(
                f"conditional StyleGAN3 (c_dim={kwargs['c_dim']}) is not supported: PULSE needs an "
                "unconditional generator; use a checkpoint trained without labels"
            )
        mapping_kwargs = dict(kwargs.get("mapping_kwargs") or {})
        unknown = set(mapping_kwargs) - _MAPPING_KEYS - _MAPPING_IGNORED
        synthesis_kwargs = {k: v for k, v in kwargs.items() if k not in _TOP_KEYS}
        unknown |= {f"synthesis:{k}" for k in set(synthesis_kwargs) - _SYNTHESIS_KEYS}
        if unknown:
            raise ModelFileError(
                f"unknown StyleGAN3 init kwargs {sorted(unknown)}: not NVIDIA's stylegan3 T/R "
                "generator (a modified fork?); refusing to guess its math"
            )
        synthesis = StyleGAN3Synthesis(
            w_dim=int(kwargs["w_dim"]),
            img_resolution=int(kwargs["img_resolution"]),
            img_channels=int(kwargs["img_channels"]),
            **synthesis_kwargs,
        )
        mapping = StyleGAN3Mapping(
            z_dim=int(kwargs["z_dim"]),
            w_dim=int(kwargs["w_dim"]),
            num_ws=synthesis.num_ws,
            **{k: v for k, v in mapping_kwargs.items() if k in _MAPPING_KEYS},
        )
        return mapping, synthesis

    @classmethod
    def from_init_kwargs(
        cls,
        init_kwargs: Mapping[str, Any],
        state_dict: Mapping[str, torch.Tensor],
        *,
        fit: GaussianFit | None = None,
        fit_samples: int = FIT_SAMPLES,
    ) -> StyleGAN3Generator:
        """A frozen generator from NVIDIA's `G_ema` init kwargs and state_dict (strict load).

        `fit`: a cached Gaussian fit; None computes it from the mapping network (fit_samples z's
        from seed 0, on the CPU) -- cache the result (`gaussian_fit.cached_gaussian_fit`), it
        takes seconds per million samples.
        """
        mapping, synthesis = cls.build(init_kwargs)
        container = nn.Module()
        container.synthesis = synthesis
        container.mapping = mapping
        state = {
            k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()
        }
        require_same_tensors(
            container.state_dict(),
            state,
            "StyleGAN3 weights do not match the network their init kwargs describe",
        )
        container.load_state_dict(state, strict=True)
        gen = cls(mapping, synthesis, fit, init_kwargs).freeze()
        if fit is None:
            gen.set_gaussian_fit(gen.compute_gaussian_fit(samples=fit_samples))
        return gen

    @classmethod
    def random(
        cls,
        resolution: int = 32,  # output side
        channel_base: int = 512,  # channels = channel_base / 2 / cutoff (before channel_max)
        channel_max: int = 64,  # at most this many channels
        config: str = "t",  # 't' or 'r' (1x1 convs, radial filters)
        seed: int = 0,  # weights, frequencies and phases come from this seed
        num_layers: int = 6,  # synthesis layers before toRGB (14 in the releases)
        num_critical: int = 2,  # critically sampled layers at the end
        margin_size: int = 10,  # pixels computed beyond the image on each side
        z_dim: int = 64,  # size of z
        w_dim: int = 64,  # size of w
        fit_samples: int = 20_000,  # z's for the Gaussian fit
        **synthesis_kwargs: Any,  # any other synthesis init kwarg (filter_size, conv_clamp, ...)
    ) -> StyleGAN3Generator:
        """A small random-weight network for tests, with every input mattering.

        NVIDIA's initialisation, except that the input's affine gets small random weights (it is
        zero at initialisation, which would make w[0] unused) and the biases are small and random;
        magnitude_ema is set from a batch of mapped z's, as training would.
        """
        if config not in _CONFIGS:
            raise ValueError(f"config must be 't' or 'r', got {config!r}")
        init_kwargs: dict[str, Any] = {
            "z_dim": z_dim,
            "c_dim": 0,
            "w_dim": w_dim,
            "img_resolution": resolution,
            "img_channels": 3,
            "mapping_kwargs": {"num_layers": 2},
            "channel_base": channel_base,
            "channel_max": channel_max,
            "num_layers": num_layers,
            "num_critical": num_critical,
            "margin_size": margin_size,
            **_CONFIGS[config],
            **synthesis_kwargs,
        }
        cpu_rng = torch.random.fork_rng(devices=[])
        with cpu_rng:
            torch.manual_seed(seed)
            mapping, synthesis = cls.build(init_kwargs)
            with torch.no_grad():
                synthesis.input.affine.weight.normal_(0.0, 0.2)
                for name, p in synthesis.named_parameters():
                    if name.endswith("bias") and not name.startswith("input."):
                        p.add_(torch.randn_like(p) * 0.1)
                for p in mapping.parameters():
                    if p.ndim == 1:
                        p.normal_(0.0, 1.0)  # raw biases; times lr_multiplier 0.01 at run time
                z = torch.randn(8, z_dim)
                synthesis.calibrate_magnitudes(mapping(z))
                mapping.w_avg.copy_(mapping.features(torch.randn(1000, z_dim)).mean(dim=0))
        gen = cls(mapping, synthesis, None, init_kwargs).freeze()
        gen.set_gaussian_fit(
            gen.compute_gaussian_fit(samples=fit_samples, chunk=min(FIT_CHUNK, fit_samples))
        )
        gen.model_id = f"random-stylegan3-{config}-{resolution}-seed{seed}"
        return gen
