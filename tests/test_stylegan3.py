"""StyleGAN3 (configs T and R): our network against a straightforward reference written here.

The reference below restates the definitions one operation at a time (zero insertion, padding,
convolution with the flipped filter, per-sample modulated weights, Fourier features from explicit
pixel coordinates), so a slip in the optimised formulation of the module shows up as a mismatch.
The layer schedule is checked against the values NVIDIA's own code prints for the 1024 x 1024
release networks, and the filter design against values computed with scipy.signal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pulse_core.downscale import downscale
from pulse_core.errors import ModelFileError
from pulse_core.generators.fir import upfirdn2d
from pulse_core.generators.stylegan3 import (
    StyleGAN3Generator,
    StyleGAN3Synthesis,
    bessel_j1,
    design_lowpass_filter,
    filtered_lrelu,
    firwin_kaiser,
    jinc_lowpass,
    kaiser_atten,
    kaiser_beta,
    layer_schedule,
    modulated_conv2d,
)
from pulse_core.restore import restore
from pulse_core.search import SearchConfig

SQRT2 = math.sqrt(2.0)
TOL = 1e-4

# ----------------------------------------------------------------------------
# The reference: one operation at a time, no fusing, no strided tricks.


def ref_upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0):
    """Zero-insert `up`, pad (x0, x1, y0, y1; < 0 crops), convolve with f, keep every `down`-th."""
    n, c, h, w = x.shape
    f = torch.ones(1, 1) if f is None else f
    f2 = torch.outer(f, f) if f.ndim == 1 else f
    u = x.new_zeros(n, c, h * up, w * up)
    u[:, :, ::up, ::up] = x
    x0, x1, y0, y1 = pad
    u = F.pad(u, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    u = u[:, :, max(-y0, 0) : u.shape[2] - max(-y1, 0), max(-x0, 0) : u.shape[3] - max(-x1, 0)]
    kernel = (f2 * gain).flip(0, 1)  # conv2d correlates; a convolution uses the flipped filter
    y = F.conv2d(u, kernel[None, None].repeat(c, 1, 1, 1), groups=c)
    return y[:, :, ::down, ::down]


def ref_filtered_lrelu(x, fu, fd, b, up, down, pad, gain, slope, clamp):
    x = x + b.view(1, -1, 1, 1)
    x = ref_upfirdn2d(x, fu, up=up, pad=pad, gain=up**2)
    x = F.leaky_relu(x, slope) * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return ref_upfirdn2d(x, fd, down=down)


def ref_modulated_conv(x, weight, styles, demodulate, padding, input_gain):
    """NVIDIA's form: batch-wide style pre-normalisation, then one weight tensor per sample."""
    if demodulate:
        weight = weight / weight.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
        styles = styles / styles.square().mean().sqrt()
    out = []
    for i in range(x.shape[0]):
        wi = weight * styles[i].view(1, -1, 1, 1)
        if demodulate:
            wi = wi / (wi.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
        out.append(F.conv2d(x[i : i + 1], wi * input_gain, padding=padding))
    return torch.cat(out)


def ref_affine(fc, w):
    """A linear layer with learning-rate multiplier 1: weight / sqrt(fan_in), raw bias."""
    return w @ (fc.weight / math.sqrt(fc.weight.shape[1])).t() + fc.bias


def ref_input(inp, w):
    """Fourier features sampled at the pixel centres (j + 1/2 - size/2) / sampling_rate."""
    t = ref_affine(inp.affine, w)
    t = t / t[:, :2].norm(dim=1, keepdim=True)
    coords = (torch.arange(inp.size, dtype=torch.float64) + 0.5 - inp.size / 2) / inp.sampling_rate
    out = []
    for i in range(w.shape[0]):
        c, s, tx, ty = (float(v) for v in t[i])
        rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
        shift = torch.tensor([[1, 0, -tx], [0, 1, -ty], [0, 0, 1]], dtype=torch.float64)
        m = rot @ shift @ inp.transform.double()
        freqs = inp.freqs.double() @ m[:2, :2]
        phases = inp.phases.double() + inp.freqs.double() @ m[:2, 2]
        amp = (
            1 - (freqs.norm(dim=1) - inp.bandwidth) / (inp.sampling_rate / 2 - inp.bandwidth)
        ).clamp(0, 1)
        arg = (
            freqs[:, 0, None, None] * coords[None, None, :]  # x runs along the width
            + freqs[:, 1, None, None] * coords[None, :, None]  # y along the height
            + phases[:, None, None]
        )
        feats = torch.sin(2 * math.pi * arg) * amp[:, None, None]
        mix = inp.weight.double() / math.sqrt(inp.channels)
        out.append(torch.einsum("oc,chw->ohw", mix, feats))
    return torch.stack(out).float()


def ref_padding(layer):
    """The padding that yields out_size samples, placed for the symmetric grid interpretation."""
    total = (layer.out_size - 1) * layer.down_factor + 1
    total -= (layer.in_size + layer.conv_kernel - 1) * layer.up_factor
    total += layer.up_taps + layer.down_taps - 2
    lo = (total + layer.up_factor) // 2
    return (lo, total - lo, lo, total - lo)


def ref_layer(layer, x, w):
    styles = ref_affine(layer.affine, w)
    if layer.is_torgb:
        styles = styles / math.sqrt(layer.in_channels * layer.conv_kernel**2)
    k = layer.conv_kernel
    x = ref_modulated_conv(
        x, layer.weight, styles, not layer.is_torgb, k - 1, 1 / layer.magnitude_ema.sqrt()
    )
    assert layer.padding == ref_padding(layer)
    return ref_filtered_lrelu(
        x,
        layer.up_filter,
        layer.down_filter,
        layer.bias,
        layer.up_factor,
        layer.down_factor,
        layer.padding,
        1.0 if layer.is_torgb else SQRT2,
        1.0 if layer.is_torgb else 0.2,
        layer.conv_clamp,
    )


def ref_synthesis(syn, ws):
    x = ref_input(syn.input, ws[:, 0])
    for i, layer in enumerate(syn.layers()):
        x = ref_layer(layer, x, ws[:, i + 1])
    return x * syn.output_scale


def ref_mapping(mapping, z):
    """(last layer's pre-activation, w): dense layers with lr multiplier 0.01, lrelu * sqrt(2)."""
    x = z / (z.square().mean(dim=1, keepdim=True) + 1e-8).sqrt()
    pre = x
    for i in range(mapping.num_layers):
        fc = getattr(mapping, f"fc{i}")
        pre = x @ (fc.weight * 0.01 / math.sqrt(fc.weight.shape[1])).t() + fc.bias * 0.01
        x = F.leaky_relu(pre, 0.2) * SQRT2
    return pre, x


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These networks are tiny: one intra-op thread is as fast, and immune to a busy machine
    (two OpenMP threads competing with other processes for two cores run 10-50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rotated(gen: StyleGAN3Generator, angle: float = 0.4) -> StyleGAN3Generator:
    """Give the input a non-trivial user transform (rotation + translation), as a user could."""
    c, s = math.cos(angle), math.sin(angle)
    with torch.no_grad():
        gen.synthesis.input.transform.copy_(torch.tensor([[c, -s, 0.3], [s, c, -0.1], [0, 0, 1]]))
    return gen


@pytest.fixture(scope="module", params=["t", "r"])
def small(request) -> StyleGAN3Generator:
    """A 32 x 32 network of either config with 4 layers + toRGB."""
    return StyleGAN3Generator.random(resolution=32, config=request.param, num_layers=4, seed=3)


# ----------------------------------------------------------------------------
# (a) the operations, the layers and the whole network against the reference


@pytest.mark.parametrize(
    ("f_shape", "up", "down", "pad"),
    [
        ((12,), 2, 1, (9, 8, 9, 8)),
        ((24,), 4, 1, (-6, -9, -6, -9)),
        ((12,), 1, 2, (0, 0, 0, 0)),
        ((12, 12), 1, 2, (0, 0, 0, 0)),
        ((5, 5), 2, 1, (3, -2, 0, 4)),
        ((6,), 2, 2, (2, 1, 2, 1)),
    ],
)
def test_upfirdn2d_matches_the_definition(f_shape, up, down, pad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 15, 15, generator=gen)
    f = torch.randn(f_shape, generator=gen)
    got = upfirdn2d(x, f, up=up, down=down, padding=pad, gain=up**2)
    want = ref_upfirdn2d(x, f, up=up, down=down, pad=pad, gain=up**2)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-6 * want.abs().max()


@pytest.mark.parametrize("clamp", [None, 0.5])
def test_filtered_lrelu_matches_the_reference(clamp):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 10, 10, generator=gen)
    fu = design_lowpass_filter(12, 2.0, 12.0, 32)
    fd = design_lowpass_filter(12, 2.0, 12.0, 32, radial=True)
    b = torch.randn(4, generator=gen)
    got = filtered_lrelu(x, fu, fd, b, 2, 2, (9, 8, 9, 8), SQRT2, 0.2, clamp)
    want = ref_filtered_lrelu(x, fu, fd, b, 2, 2, (9, 8, 9, 8), SQRT2, 0.2, clamp)
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_equals_per_sample_modulated_weights(demodulate):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 8, 8, generator=gen)
    weight = torch.randn(6, 5, 3, 3, generator=gen)
    styles = torch.randn(3, 5, generator=gen) + 1
    gain = torch.tensor(0.7)
    got = modulated_conv2d(x, weight, styles, demodulate, 2, gain)
    want = ref_modulated_conv(x, weight, styles, demodulate, 2, gain)
    assert got.shape == want.shape == (3, 6, 10, 10)
    assert (got - want).abs().max() < 1e-5


def test_fourier_input_matches_explicit_pixel_coordinates(small):
    syn = _rotated(small).synthesis
    w = torch.randn(2, syn.w_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = syn.input(w)
    assert (got - ref_input(syn.input, w)).abs().max() < 1e-5


def test_every_layer_matches_the_reference(small):
    syn = small.synthesis
    gen = torch.Generator().manual_seed(5)
    ws = small.prior(torch.randn(2, small.num_latents, small.latent_dim, generator=gen))
    with torch.no_grad():
        x = syn.input(ws[:, 0])
        for i, layer in enumerate(syn.layers()):
            got, want = layer(x, ws[:, i + 1]), ref_layer(layer, x, ws[:, i + 1])
            scale = want.abs().max()
            assert (got - want).abs().max() < TOL * max(1.0, float(scale)), layer
            x = want


@pytest.mark.parametrize(
    ("config", "resolution", "num_layers"), [("t", 16, 14), ("r", 16, 14), ("t", 32, 6)]
)
def test_whole_network_matches_the_reference(config, resolution, num_layers):
    g = _rotated(
        StyleGAN3Generator.random(resolution, config=config, num_layers=num_layers, seed=7)
    )
    z = torch.randn(2, g.mapping.z_dim, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = g(z)
        _, w = ref_mapping(g.mapping, z)
        want = ref_synthesis(g.synthesis, w[:, None].expand(-1, g.num_latents, -1))
    assert got.shape == (2, 3, resolution, resolution)
    assert want.abs().max() > 0.05  # a real image, not a collapsed one
    assert (got - want).abs().max() < TOL


def test_w_plus_input_matches_the_reference(small):
    """PULSE feeds a different w to every layer: check that path too, with a clamping layer."""
    g = small
    ws = g.prior(
        torch.randn(2, g.num_latents, g.latent_dim, generator=torch.Generator().manual_seed(9))
    )
    with torch.no_grad():
        got = g.synthesize(ws, [])
        want = ref_synthesis(g.synthesis, ws)
    assert (got - want).abs().max() < TOL


def test_rows_of_a_batch_are_independent(small):
    ws = torch.randn(
        3, small.num_latents, small.latent_dim, generator=torch.Generator().manual_seed(10)
    )
    with torch.no_grad():
        together = small.synthesize(small.prior(ws), [])
        alone = small.synthesize(small.prior(ws[1:2]), [])
    assert (together[1:2] - alone).abs().max() < 1e-5


def test_runs_in_float32_even_where_nvidia_uses_float16():
    syn = StyleGAN3Synthesis(w_dim=8, img_resolution=16, channel_base=64, channel_max=8)
    assert any(layer.use_fp16 for layer in syn.layers())
    out = syn(torch.randn(1, syn.num_ws, 8))
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------
# The layer schedule: NVIDIA's printed summaries of the 1024 x 1024 releases.

T1024_NAMES = [
    "L0_36_512", "L1_36_512", "L2_52_512", "L3_52_512", "L4_84_512", "L5_148_512", "L6_148_512",
    "L7_276_323", "L8_276_203", "L9_532_128", "L10_1044_81", "L11_1044_51", "L12_1044_32",
    "L13_1024_32", "L14_1024_3",
]  # fmt: skip
T1024_OUT_RATE = [16, 16, 32, 32, 64, 128, 128, 256, 256, 512, 1024, 1024, 1024, 1024, 1024]
T1024_OUT_CUTOFF = [
    2, 3.1748, 5.03968, 8, 12.6992, 20.1587, 32, 50.7968, 80.6349, 128, 203.187, 322.54, 512, 512,
    512,
]  # fmt: skip
T1024_OUT_HALF_WIDTH = [
    6, 4.8252, 10.9603, 8, 19.3008, 43.8413, 32, 77.2032, 47.3651, 128, 308.813, 189.46, 118.346,
    118.346, 118.346,
]  # fmt: skip
R1024_NAMES = [
    "L0_36_1024", "L1_36_1024", "L2_52_1024", "L3_52_1024", "L4_84_1024", "L5_148_1024",
    "L6_148_1024", "L7_276_645", "L8_276_406", "L9_532_256", "L10_1044_161", "L11_1044_102",
    "L12_1044_64", "L13_1024_64", "L14_1024_3",
]  # fmt: skip
# elements of each layer's buffers (magnitude_ema + up_filter + down_filter) and parameters
# (weight + bias, affine excluded), from NVIDIA's summary table of stylegan3-r-ffhq-1024x1024
R1024_BUFFERS = [157, 157, 169, 157, 169, 169, 157, 169, 157, 169, 169, 157, 25, 25, 1]
R1024_PARAMS = {"L0_36_1024": 1049600, "L7_276_645": 661125, "L8_276_406": 262276,
                "L9_532_256": 104192, "L10_1044_161": 41377, "L11_1044_102": 16524,
                "L12_1044_64": 6592, "L13_1024_64": 4160, "L14_1024_3": 195}  # fmt: skip


RELEASE_KWARGS = {
    # G_ema init kwargs of stylegan3-{t,r}-ffhq-1024x1024 (NVIDIA's train.py defaults)
    "t": {"z_dim": 512, "c_dim": 0, "w_dim": 512, "img_resolution": 1024, "img_channels": 3,
          "mapping_kwargs": {"num_layers": 2}, "channel_base": 32768, "channel_max": 512,
          "magnitude_ema_beta": 0.5 ** (32 / 20000)},
    "r": {"z_dim": 512, "c_dim": 0, "w_dim": 512, "img_resolution": 1024, "img_channels": 3,
          "mapping_kwargs": {"num_layers": 2}, "channel_base": 65536, "channel_max": 1024,
          "magnitude_ema_beta": 0.5 ** (32 / 20000), "conv_kernel": 1,
          "use_radial_filters": True},
}  # fmt: skip


def _release(config: str) -> StyleGAN3Synthesis:
    return StyleGAN3Generator.build(RELEASE_KWARGS[config])[1]


def test_t1024_schedule_matches_nvidias_summary():
    syn = _release("t")
    assert syn.layer_names == T1024_NAMES
    assert syn.num_ws == 16
    assert (syn.input.channels, syn.input.size) == (512, 36)
    assert (syn.input.sampling_rate, syn.input.bandwidth) == (16, 2)
    for i, layer in enumerate(syn.layers()):
        assert layer.out_sampling_rate == T1024_OUT_RATE[i]
        assert layer.out_cutoff == pytest.approx(T1024_OUT_CUTOFF[i], rel=1e-5)
        assert layer.out_half_width == pytest.approx(T1024_OUT_HALF_WIDTH[i], rel=1e-5)
        assert layer.is_critically_sampled == (i >= 12)
        assert layer.use_fp16 == (i >= 5)
        assert layer.is_torgb == (i == 14)
        assert layer.conv_kernel == (1 if i == 14 else 3)


def test_r1024_layers_match_nvidias_summary():
    syn = _release("r")
    assert syn.layer_names == R1024_NAMES
    for i, layer in enumerate(syn.layers()):
        buffers = sum(b.numel() for b in layer.buffers())
        assert buffers == R1024_BUFFERS[i], layer
        if layer.down_radial:
            assert layer.down_filter.shape == (12, 12)
        name = syn.layer_names[i]
        if name in R1024_PARAMS:
            assert layer.weight.numel() + layer.bias.numel() == R1024_PARAMS[name]
    assert sum(b.numel() for b in syn.input.buffers()) == 3081


def test_r1024_parameter_and_buffer_totals_match_nvidias_summary():
    mapping, syn = StyleGAN3Generator.build(RELEASE_KWARGS["r"])
    params = sum(p.numel() for p in mapping.parameters()) + sum(p.numel() for p in syn.parameters())
    buffers = sum(b.numel() for b in mapping.buffers()) + sum(b.numel() for b in syn.buffers())
    assert (params, buffers) == (15093151, 5600)


def test_schedule_has_one_entry_per_layer_and_ends_at_nyquist():
    s = layer_schedule(256, num_layers=10, num_critical=3)
    assert all(len(v) == 11 for v in s.values())
    assert s["cutoffs"][-4:] == pytest.approx([128] * 4)
    assert s["sampling_rates"][-1] == 256 and s["sizes"][-1] == 256 and s["channels"][-1] == 3


# ----------------------------------------------------------------------------
# (b) filter design without scipy (the release pickles carry their filters as buffers; only
# building a new network designs them)


def test_kaiser_formulas_give_scipys_documented_values():
    assert kaiser_atten(211, 0.0375) == pytest.approx(64.48099630593983, rel=1e-14)
    assert kaiser_beta(65) == pytest.approx(6.20426, rel=1e-14)
    assert kaiser_beta(30) == pytest.approx(2.1166248611409806, rel=1e-14)  # middle branch
    assert kaiser_beta(15) == 0.0


def test_bessel_j1_known_values():
    x = np.array([0.0, 1.0, 2.5, 10.0, 30.0, 3.8317059702075125])
    want = [0.0, 0.44005058574493355, 0.497094102464274, 0.04347274616886141,
            -0.11875106261662305, 0.0]  # fmt: skip
    assert bessel_j1(x) == pytest.approx(want, abs=1e-14)


def test_firwin_hand_checked_three_taps():
    # cutoff 0.5 of Nyquist, narrow enough attenuation (15 dB) that the Kaiser window is flat:
    # h = 0.5 * sinc(0.5 * [-1, 0, 1]) = [1/pi, 1/2, 1/pi], scaled to sum 1
    got = firwin_kaiser(3, cutoff=0.5, width=0.5, fs=2.0)
    want = np.array([1 / math.pi, 0.5, 1 / math.pi]) / (0.5 + 2 / math.pi)
    assert got == pytest.approx(want, rel=1e-14)


def test_firwin_matches_scipy_values():
    # scipy.signal.firwin(12, 2, width=12, fs=32): the first up-filter of the T-1024 release
    want = [0.00079190214974063, 0.01001831815662321, 0.03894952247200142,
            0.09241278989917955, 0.1565256153446172, 0.20130185197783798]  # fmt: skip
    assert firwin_kaiser(12, 2.0, 12.0, 32.0) == pytest.approx(want + want[::-1], rel=1e-12)
    # scipy.signal.firwin(6, 0.3, width=0.2, fs=1)
    want = [-0.11967615451272866, 0.06736159222414287, 0.5523145622885858]
    assert firwin_kaiser(6, 0.3, 0.2, 1.0) == pytest.approx(want + want[::-1], rel=1e-12)


def test_radial_filter_matches_scipy_values():
    # NVIDIA's jinc design evaluated with scipy.special.j1 and scipy.signal.kaiser_beta
    f = jinc_lowpass(12, 2.0, 12.0, 32.0)
    assert f.shape == (12, 12) and f.sum() == pytest.approx(1.0, rel=1e-14)
    assert f[0, 0] == pytest.approx(8.412096704036594e-07, rel=1e-10)
    assert f[5, 5] == pytest.approx(0.038754885402425575, rel=1e-12)
    assert f[2, 7] == pytest.approx(0.006436506870082382, rel=1e-12)
    assert f[0, 6] == pytest.approx(0.0002052621264188234, rel=1e-12)
    f = jinc_lowpass(24, 5.039684199579493, 2 * 10.960315800420507, 64.0)
    assert f[11, 11] == pytest.approx(0.025458482163928466, rel=1e-12)
    assert f[4, 17] == pytest.approx(-4.027810587520211e-05, rel=1e-10)
    assert np.allclose(f, f.T) and np.allclose(f, f[::-1, ::-1])


def test_filters_match_scipy_when_it_is_installed():
    scipy_signal = pytest.importorskip("scipy.signal")
    scipy_special = pytest.importorskip("scipy.special")
    for config in ("t", "r"):
        for layer in _release(config).layers():
            if layer.up_filter is not None:
                want = scipy_signal.firwin(
                    layer.up_taps,
                    layer.in_cutoff,
                    width=layer.in_half_width * 2,
                    fs=layer.tmp_sampling_rate,
                )
                assert torch.equal(layer.up_filter, torch.as_tensor(want, dtype=torch.float32))
            if layer.down_radial:
                n, fs = layer.down_taps, layer.tmp_sampling_rate
                x = (np.arange(n) - (n - 1) / 2) / fs
                r = np.hypot(*np.meshgrid(x, x))
                f = scipy_special.j1(2 * layer.out_cutoff * np.pi * r) / (np.pi * r)
                atten = scipy_signal.kaiser_atten(n, layer.out_half_width * 2 / (fs / 2))
                k = np.kaiser(n, scipy_signal.kaiser_beta(atten))
                f = f * np.outer(k, k)
                assert (layer.down_filter - torch.as_tensor(f / f.sum())).abs().max() < 1e-7


def test_one_tap_filters_are_identity_and_absent_from_the_state_dict():
    assert design_lowpass_filter(1, 2.0, 1.0, 4.0) is None
    syn = StyleGAN3Synthesis(w_dim=8, img_resolution=16, channel_base=64, channel_max=8)
    torgb = syn.layer_names[-1]
    assert torgb == "L14_16_3"
    keys = set(syn.state_dict())
    assert f"{torgb}.up_filter" not in keys and f"{torgb}.down_filter" not in keys
    assert f"{torgb}.magnitude_ema" in keys and "L13_16_4.up_filter" in keys


# ----------------------------------------------------------------------------
# (c) NVIDIA's G_ema keys and loading through from_init_kwargs


def test_state_dict_has_exactly_nvidias_keys():
    g = StyleGAN3Generator.random(resolution=32, config="t", num_layers=4, fit_samples=100)
    names = ["L0_36_64", "L1_52_45", "L2_52_16", "L3_32_16", "L4_32_3"]
    assert g.synthesis.layer_names == names
    want = ["synthesis.input." + k for k in
            ("weight", "transform", "freqs", "phases", "affine.weight", "affine.bias")]  # fmt: skip
    for name in names:
        per_layer = ["weight", "bias", "magnitude_ema", "up_filter", "down_filter"]
        if name == names[-1]:
            per_layer = per_layer[:3]  # toRGB: no filters (None buffers)
        want += [f"synthesis.{name}.{k}" for k in [*per_layer, "affine.weight", "affine.bias"]]
    # a module's own parameters and buffers come before its children's
    want += ["mapping.w_avg", "mapping.fc0.weight", "mapping.fc0.bias"]
    want += ["mapping.fc1.weight", "mapping.fc1.bias"]
    sd = g.state_dict()
    assert list(sd) == want
    assert sd["synthesis.L0_36_64.magnitude_ema"].shape == ()
    assert sd["synthesis.input.freqs"].shape == (64, 2)
    assert sd["synthesis.L1_52_45.up_filter"].shape == (24,)  # 4x upsampling, 6 taps per unit


def test_state_dict_round_trips_through_from_init_kwargs(small, tmp_path):
    torch.save(small.state_dict(), tmp_path / "g.pt")
    state = torch.load(tmp_path / "g.pt", map_location="cpu", weights_only=True)
    again = StyleGAN3Generator.from_init_kwargs(small.init_kwargs, state, fit=small.fit)
    assert again.config == small.config
    assert list(again.state_dict()) == list(small.state_dict())
    for k, v in small.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    ws = small.prior(torch.randn(1, small.num_latents, small.latent_dim))
    with torch.no_grad():
        assert torch.equal(again.synthesize(ws, []), small.synthesize(ws, []))
    assert not any(p.requires_grad for p in again.parameters())  # frozen


def test_from_init_kwargs_accepts_nested_synthesis_kwargs(small):
    kwargs = dict(small.init_kwargs)
    nested = {k: kwargs.pop(k) for k in ("channel_base", "channel_max", "num_layers")}
    again = StyleGAN3Generator.from_init_kwargs(
        {**kwargs, "synthesis_kwargs": nested}, small.state_dict(), fit=small.fit
    )
    assert again.synthesis.layer_names == small.synthesis.layer_names


def test_from_init_kwargs_computes_the_fit_when_none_is_given(small):
    again = StyleGAN3Generator.from_init_kwargs(
        small.init_kwargs, small.state_dict(), fit_samples=500
    )
    direct = small.compute_gaussian_fit(samples=500)
    assert torch.equal(again.fit_mean, direct.mean) and torch.equal(again.fit_std, direct.std)


def test_conditional_networks_are_refused(small):
    with pytest.raises(ModelFileError, match="conditional"):
        StyleGAN3Generator.from_init_kwargs({**small.init_kwargs, "c_dim": 10}, {})


def test_unknown_init_kwargs_are_refused(small):
    with pytest.raises(ModelFileError, match="unknown StyleGAN3 init kwargs"):
        StyleGAN3Generator.from_init_kwargs({**small.init_kwargs, "use_noise": True}, {})


def test_missing_unexpected_and_misshapen_weights_are_refused(small):
    sd = small.state_dict()
    missing = {k: v for k, v in sd.items() if k != "mapping.w_avg"}
    with pytest.raises(ModelFileError, match=r"missing 1 .*mapping\.w_avg"):
        StyleGAN3Generator.from_init_kwargs(small.init_kwargs, missing, fit=small.fit)
    with pytest.raises(ModelFileError, match=r"unexpected 1 .*L0_36_64\.noise_strength"):
        StyleGAN3Generator.from_init_kwargs(
            small.init_kwargs, {**sd, "synthesis.L0_36_64.noise_strength": torch.zeros([])}
        )
    with pytest.raises(ModelFileError, match=r"wrong shape.*mapping\.w_avg \(3,\)"):
        StyleGAN3Generator.from_init_kwargs(
            small.init_kwargs, {**sd, "mapping.w_avg": torch.zeros(3)}, fit=small.fit
        )


# ----------------------------------------------------------------------------
# The Generator protocol and the prior


def test_protocol_no_noise_and_one_latent_per_synthesis_input(small):
    assert small.family == "stylegan3"
    assert small.noise_shapes == ()
    assert small.num_latents == small.synthesis.num_layers + 2 == 6
    assert small.latent_dim == 64 and small.resolution == 32
    with pytest.raises(ValueError, match="no noise"):
        small.synthesize(torch.zeros(1, 6, 64), [torch.zeros(1, 1, 4, 4)])


def test_prior_is_the_mappings_final_activation(small):
    z = torch.randn(5, small.mapping.z_dim)
    with torch.no_grad():
        pre, w = ref_mapping(small.mapping, z)
        v = (pre - small.fit_mean) / small.fit_std
        assert (small.prior(v) - w).abs().max() < 1e-5
        assert (small.mapping.features(z) - w).abs().max() < 1e-5
    v = torch.zeros(1, small.num_latents, small.latent_dim)
    assert torch.allclose(small.prior(v)[0, 0], SQRT2 * F.leaky_relu(small.fit_mean, 0.2))


# ----------------------------------------------------------------------------
# (e) the Gaussian fit inverts the activation and its gain


def test_gaussian_fit_is_the_mean_and_std_of_the_pre_activation(small):
    fit = small.compute_gaussian_fit(samples=3000, seed=5, chunk=1000)
    rng = torch.Generator().manual_seed(5)
    z = torch.cat([torch.randn(1000, small.mapping.z_dim, generator=rng) for _ in range(3)])
    with torch.no_grad():
        pre, _ = ref_mapping(small.mapping, z)
    pre = pre.double()
    assert torch.allclose(fit.mean.double(), pre.mean(0), atol=1e-5)
    assert torch.allclose(fit.std.double(), pre.std(0), rtol=1e-4, atol=1e-6)
    # without undoing the sqrt(2) gain the fit would be off by that factor
    assert not torch.allclose(fit.std.double(), pre.std(0) * SQRT2, rtol=0.1)


# ----------------------------------------------------------------------------
# (d) PULSE on StyleGAN3: W+ search, no noise, samples by restarts


def test_pulse_finds_a_latent_that_downscales_to_the_target(small):
    z = torch.randn(1, small.mapping.z_dim, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        hr = (small(z) + 1) / 2
    lr = downscale(hr, 4)[0]  # 8 x 8
    # The paper's eps and schedule; random networks need more steps than a trained one, so
    # allow 200 (these converge in 20-90 steps at eps 2e-3, and in at most ~140 at 1e-3).
    config = SearchConfig(steps=200, eps=2e-3, early_stop=True)
    result = restore(lr, small, samples=2, config=config, seed=0)
    assert len(result.samples) == 2
    for sample in result.samples:
        assert sample.history["MSE"][0] > 3 * config.eps  # the start was far off
        assert sample.converged and sample.mse <= config.eps
        assert sample.noise == []
        assert sample.hr.shape == (3, 32, 32)
    # two restarts give two different solutions
    assert (result.samples[0].latent - result.samples[1].latent).abs().max() > 0.1
