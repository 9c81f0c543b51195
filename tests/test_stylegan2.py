"""StyleGAN2 (NVIDIA's StyleGAN2-ADA architecture): resampling, forward pass, W fit, search.

"Equals the original network" is shown against an independent reference written here from the
definitions in NVIDIA's code (`_upfirdn2d_ref`, the generic path of `conv2d_resample`, the
non-fused `modulated_conv2d`, `_bias_act_ref`), sample by sample, reading NVIDIA-named tensors
straight from a state_dict: the original code cannot be installed here (it needs its own
repository and compiled ops).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pulse_core.downscale import downscale
from pulse_core.errors import ModelFileError
from pulse_core.generators.fir import setup_filter, upfirdn2d, upsample2d
from pulse_core.generators.stylegan2 import StyleGAN2Generator, conv2d_resample
from pulse_core.search import InitialState, SearchConfig, initial_state, search

SQRT2 = math.sqrt(2.0)

# ----------------------------------------------------------------------------
# Helpers shared with test_nvidia_pickle.py and test_rosinality.py


def tiny_init_kwargs(resolution: int = 16, **synthesis: object) -> dict:
    """NVIDIA-style init kwargs of a small unconditional StyleGAN2 (stylegan2-ada-pytorch layout)."""
    synthesis_kwargs = {"channel_base": 8 * resolution, "channel_max": 16, "num_fp16_res": 2}
    synthesis_kwargs.update(synthesis)
    return {
        "z_dim": 12,
        "c_dim": 0,
        "w_dim": 10,
        "img_resolution": resolution,
        "img_channels": 3,
        "mapping_kwargs": {"num_layers": 2},
        "synthesis_kwargs": synthesis_kwargs,
    }


def randomise(gen: StyleGAN2Generator, seed: int = 0) -> StyleGAN2Generator:
    """Random biases, noise strengths and w_avg, so every tensor matters in comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in gen.state_dict().items():
            if name.endswith("resample_filter"):
                continue
            if name.endswith("affine.bias"):
                t.copy_(1 + torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith(("bias", "noise_strength", "w_avg")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            else:
                t.copy_(torch.randn(t.shape, generator=g))
            if name.endswith("torgb.weight"):
                t.mul_(0.5)  # images mostly within [-1, 1], like a trained network's
    return gen


def tiny_stylegan2(resolution: int = 16, seed: int = 0, **synthesis: object) -> StyleGAN2Generator:
    gen = StyleGAN2Generator.from_init_kwargs(tiny_init_kwargs(resolution, **synthesis))
    return randomise(gen, seed).freeze()


# ----------------------------------------------------------------------------
# Independent reference of NVIDIA's math


def ref_upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0):
    """Zero-insert, pad (negative = crop), correlate with the flipped 2-D filter, decimate."""
    px0, px1, py0, py1 = pad
    n, c, h, w = x.shape
    z = x.new_zeros(n, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    z = z[:, :, max(-py0, 0) : z.shape[2] - max(-py1, 0), max(-px0, 0) : z.shape[3] - max(-px1, 0)]
    f2 = torch.outer(f, f) if f.ndim == 1 else f
    k = (f2 * gain).flip(0, 1)[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(z, k, groups=c)[:, :, ::down, ::down]


def ref_layer(sd, p, x, w, noise, up, clamp, gain=1.0):
    """One SynthesisLayer for ONE sample: modulate, demodulate, (upsample) conv, noise, bias_act."""
    weight = sd[p + "weight"]
    styles = sd[p + "affine.weight"] @ w / math.sqrt(w.numel()) + sd[p + "affine.bias"]
    wt = weight * styles[None, :, None, None]
    wt = wt * (wt.square().sum(dim=[1, 2, 3]) + 1e-8).rsqrt()[:, None, None, None]
    f = sd[p + "resample_filter"]
    if up:  # conv2d_resample's generic path: FIR-upsample with padding, then true convolution
        x = ref_upfirdn2d(x[None], f, up=2, pad=(3, 2, 3, 2), gain=4.0)
        x = F.conv2d(x, wt.flip(2, 3))[0]
    else:
        x = F.conv2d(x[None], wt, padding=1)[0]
    if noise is not None:
        x = x + sd[p + "noise_strength"] * noise
    x = F.leaky_relu(x + sd[p + "bias"][:, None, None], 0.2) * (SQRT2 * gain)
    return x.clamp(-clamp * gain, clamp * gain) if clamp is not None else x


def ref_torgb(sd, p, x, w, clamp):
    styles = sd[p + "affine.weight"] @ w / math.sqrt(w.numel()) + sd[p + "affine.bias"]
    styles = styles / math.sqrt(x.shape[0])
    y = F.conv2d(x[None], sd[p + "weight"] * styles[None, :, None, None])[0]
    y = y + sd[p + "bias"][:, None, None]
    return y.clamp(-clamp, clamp) if clamp is not None else y


def ref_synthesis(sd, ws, noise, resolution, architecture="skip", clamp=None):
    """NVIDIA's SynthesisNetwork, sample by sample; `noise` is a list of [N, 1, r, r] maps."""
    out = []
    for b in range(ws.shape[0]):
        wi, ni = 0, 0
        x = img = None
        res = 4
        while res <= resolution:
            p = f"synthesis.b{res}."
            last = res == resolution
            if res == 4:
                x = ref_layer(
                    sd, p + "conv1.", sd[p + "const"], ws[b, wi], noise[ni][b, 0], 0, clamp
                )
                wi, ni = wi + 1, ni + 1
            else:
                x_in = x
                x = ref_layer(sd, p + "conv0.", x_in, ws[b, wi], noise[ni][b, 0], 1, clamp)
                g = math.sqrt(0.5) if architecture == "resnet" else 1.0
                x = ref_layer(sd, p + "conv1.", x, ws[b, wi + 1], noise[ni + 1][b, 0], 0, clamp, g)
                if architecture == "resnet":
                    skip = sd[p + "skip.weight"] / math.sqrt(x_in.shape[0])
                    y = F.conv2d(x_in[None], skip)
                    y = ref_upfirdn2d(
                        y, sd[p + "resample_filter"], up=2, pad=(2, 1, 2, 1), gain=4.0
                    )
                    x = y[0] * math.sqrt(0.5) + x
                wi, ni = wi + 2, ni + 2
            if img is not None:
                img = ref_upfirdn2d(
                    img[None], sd[p + "resample_filter"], 2, pad=(2, 1, 2, 1), gain=4
                )[0]
            if last or architecture == "skip":
                y = ref_torgb(sd, p + "torgb.", x, ws[b, wi], clamp)
                img = img + y if img is not None else y
            res *= 2
        out.append(img)
    return torch.stack(out)


def ref_mapping(sd, z, num_layers):
    x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
    for i in range(num_layers):
        weight = sd[f"mapping.fc{i}.weight"]
        x = x @ (weight * (0.01 / math.sqrt(weight.shape[1]))).t()
        x = F.leaky_relu(x + sd[f"mapping.fc{i}.bias"] * 0.01, 0.2) * SQRT2
    return x


# ----------------------------------------------------------------------------
# Resampling


def test_upsampling_a_constant_image_gives_the_hand_computed_edges():
    # 1-D: zero-insert [1,1,1,1], pad (2, 1), filter [1,3,3,1]/8 * 2 -> .75 at the ends, 1 inside.
    row = torch.tensor([0.75, 1, 1, 1, 1, 1, 1, 0.75])
    out = upsample2d(torch.ones(1, 1, 4, 4), setup_filter([1, 3, 3, 1]))
    assert out.shape == (1, 1, 8, 8)
    assert torch.allclose(out[0, 0], torch.outer(row, row), atol=1e-6)


def test_upfirdn2d_is_a_true_convolution_with_the_filter():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = upfirdn2d(x, f, padding=[1, 0, 1, 0])[0, 0]  # pad left/top by 1: 4x4 out
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = f  # a delta reproduces the filter where it sits
    assert torch.equal(out, expected)


def test_setup_filter_matches_nvidia_normalisation():
    f = setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4) and float(f.sum()) == pytest.approx(1.0)
    assert float(f[0, 0]) == 1 / 64 and float(f[1, 1]) == 9 / 64
    assert setup_filter([1] * 8).shape == (8,)  # 8+ taps stay separable


@pytest.mark.parametrize(
    ("up", "down", "pad", "taps"),
    [
        (2, 1, (2, 1, 2, 1), [1, 3, 3, 1]),
        (2, 1, (1, 1, 1, 1), [1, 3, 3, 1]),
        (1, 1, (1, 2, 2, 1), [1, 3, 3, 1]),
        (1, 2, (1, 1, 1, 1), [1, 3, 3, 1]),
        (2, 1, (-1, 3, 0, -2), [1, 2, 1]),
        (2, 2, (2, 1, 2, 1), [1, 3, 3, 1]),
        (2, 1, (4, 3, 4, 3), [1, 2, 3, 4, 4, 3, 2, 1]),  # separable 8-tap filter
    ],
)
def test_upfirdn2d_matches_the_reference_definition(up, down, pad, taps):
    x = torch.randn(2, 3, 6, 5)
    f = setup_filter(taps)
    ours = upfirdn2d(x, f, up=up, down=down, padding=pad, gain=up * up)
    ref = ref_upfirdn2d(x, f, up=up, down=down, pad=pad, gain=up * up)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5)


def test_transposed_conv_upsampling_equals_zero_insertion_then_convolution():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    f = setup_filter([1, 3, 3, 1])
    ours = conv2d_resample(x, w, f, up=2, padding=1, flip_weight=False)
    ref = F.conv2d(ref_upfirdn2d(x, f, up=2, pad=(3, 2, 3, 2), gain=4.0), w.flip(2, 3))
    assert ours.shape == (2, 6, 10, 10)
    assert torch.allclose(ours, ref, atol=1e-4)


# ----------------------------------------------------------------------------
# The network


def test_state_dict_has_nvidias_keys_and_shapes_at_1024():
    gen = StyleGAN2Generator.from_init_kwargs(
        {
            "z_dim": 512,
            "c_dim": 0,
            "w_dim": 512,
            "img_resolution": 1024,
            "img_channels": 3,
            "mapping_kwargs": {"num_layers": 8},
            "synthesis_kwargs": {"channel_base": 32768, "channel_max": 512, "conv_clamp": 256},
        }
    )
    sd = gen.state_dict()
    assert len(sd) == 182  # 8*2 + w_avg; 4x4 block 13; 8 blocks of 19
    assert sd["mapping.w_avg"].shape == (512,)
    assert sd["synthesis.b4.const"].shape == (512, 4, 4)
    assert sd["synthesis.b64.conv0.weight"].shape == (512, 512, 3, 3)
    assert sd["synthesis.b128.conv0.weight"].shape == (256, 512, 3, 3)
    assert sd["synthesis.b1024.conv1.noise_const"].shape == (1024, 1024)
    assert sd["synthesis.b1024.conv1.noise_strength"].shape == ()
    assert sd["synthesis.b1024.torgb.weight"].shape == (3, 32, 1, 1)
    assert sd["synthesis.b8.conv0.resample_filter"].shape == (4, 4)
    assert not any(k.startswith("fit_") for k in sd)
    assert gen.num_latents == 18 and gen.latent_dim == 512
    assert [h for h, _ in gen.noise_shapes] == [4] + [
        r for r in (8, 16, 32, 64, 128, 256, 512, 1024) for _ in (0, 1)
    ]


@pytest.mark.parametrize("architecture", ["skip", "orig", "resnet"])
@pytest.mark.parametrize("fused", [True, False])
def test_forward_matches_the_reference_implementation(architecture, fused):
    gen = tiny_stylegan2(16, architecture=architecture, conv_clamp=2.0)
    gen.synthesis.set_fused_modconv(fused)
    torch.manual_seed(1)
    ws = torch.randn(2, gen.num_latents, gen.latent_dim)
    noise = [torch.randn(2, 1, h, w) for h, w in gen.noise_shapes]
    with torch.no_grad():
        ours = gen.synthesize(ws, noise)
        ref = ref_synthesis(gen.state_dict(), ws, noise, 16, architecture, clamp=2.0)
    assert ours.shape == (2, 3, 16, 16)
    assert float((ours - ref).abs().max()) < 1e-4


def test_mapping_matches_the_reference_and_truncation_lerps_to_w_avg():
    gen = tiny_stylegan2(8)
    z = torch.randn(4, gen.z_dim)
    with torch.no_grad():
        ws = gen.mapping_ws(z)
        ref = ref_mapping(gen.state_dict(), z, 2)
        half = gen.mapping_ws(z, truncation_psi=0.5)
    assert ws.shape == (4, gen.num_latents, gen.latent_dim)
    assert torch.allclose(ws[:, 3], ref, atol=1e-5)
    assert torch.allclose(half, gen.mapping.w_avg + 0.5 * (ws - gen.mapping.w_avg), atol=1e-5)


def test_const_noise_mode_uses_the_stored_maps():
    gen = tiny_stylegan2(8)
    ws = torch.randn(1, gen.num_latents, gen.latent_dim)
    const = gen.const_noise()
    assert [tuple(c.shape[-2:]) for c in const] == list(gen.noise_shapes)
    with torch.no_grad():
        a = gen.synthesize(ws, const)
        b = ref_synthesis(gen.state_dict(), ws, const, 8)
    assert torch.allclose(a, b, atol=1e-4)


def test_a_network_without_noise_inputs_takes_none():
    gen = tiny_stylegan2(8, use_noise=False)
    assert gen.noise_shapes == ()
    out = gen.synthesize(torch.randn(1, gen.num_latents, gen.latent_dim), [])
    assert out.shape == (1, 3, 8, 8)


def test_conditional_and_unknown_configurations_are_refused():
    kwargs = tiny_init_kwargs(8)
    with pytest.raises(ModelFileError, match="class-conditional"):
        StyleGAN2Generator.from_init_kwargs({**kwargs, "c_dim": 10})
    with pytest.raises(ModelFileError, match="unsupported StyleGAN2 generator option"):
        StyleGAN2Generator.from_init_kwargs({**kwargs, "synthesis_kwargs": {"magic": 1}})


def test_a_state_dict_with_missing_or_extra_tensors_is_refused_with_their_names():
    gen = tiny_stylegan2(8)
    sd = dict(gen.state_dict())
    sd.pop("synthesis.b8.conv1.noise_strength")
    sd["synthesis.b8.extra"] = torch.zeros(1)
    with pytest.raises(ModelFileError, match=r"missing 1 .*noise_strength.*unexpected 1 .*extra"):
        StyleGAN2Generator.from_init_kwargs(tiny_init_kwargs(8), sd)


# ----------------------------------------------------------------------------
# The Gaussian fit of W and PULSE


def test_gaussian_fit_undoes_the_final_lrelu_and_its_gain():
    gen = tiny_stylegan2(8)
    fit = gen.compute_gaussian_fit(samples=3000, seed=5, chunk=1000)
    z = torch.randn(3000, gen.z_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = F.leaky_relu(ref_mapping(gen.state_dict(), z, 2) / SQRT2, 5.0).double()
    assert torch.allclose(fit.mean.double(), x.mean(0), atol=1e-5)
    assert torch.allclose(fit.std.double(), x.std(0), atol=1e-5)


def test_prior_maps_the_whitened_fit_back_onto_w():
    gen = tiny_stylegan2(8)
    fit = gen.compute_gaussian_fit(samples=2000)
    gen.set_gaussian_fit(fit)
    with torch.no_grad():
        w = gen.mapping(torch.randn(5, gen.z_dim))
        v = (F.leaky_relu(w / SQRT2, 5.0) - fit.mean) / fit.std
        assert torch.allclose(gen.prior(v[:, None]), w[:, None], atol=1e-5)


def test_prior_without_a_fit_says_what_to_do():
    with pytest.raises(ModelFileError, match="ensure_gaussian_fit"):
        tiny_stylegan2(8).prior(torch.zeros(1, 4, 10))


def test_relu_mapping_cannot_be_inverted():
    kwargs = tiny_init_kwargs(8)
    kwargs["mapping_kwargs"] = {"num_layers": 2, "activation": "relu"}
    gen = StyleGAN2Generator.from_init_kwargs(kwargs)
    with pytest.raises(ModelFileError, match="ReLU"):
        gen.compute_gaussian_fit(samples=10)


def pulse_recovers_own_sample(gen, *, seed: int = 7, factor: int = 4, eps: float = 2e-4):
    """Search for one of the generator's own samples from its LR image (not clamped: a random
    network's image may leave [0, 1] a little, and clamping would make it unreachable)."""
    config = SearchConfig(steps=200, eps=eps, early_stop=True)
    target = initial_state(gen, [seed], config)
    with torch.no_grad():
        hr = (gen.synthesize(gen.prior(target.latent), target.noise) + 1) / 2
    lr = downscale(hr, factor)
    start = initial_state(gen, [seed + 1000], config)
    out = search(gen, lr, InitialState(start.latent, start.noise), config)
    first = float(out.history["MSE"][0, 0])
    assert first > 10 * eps, f"the start is already close ({first:.2e}): the test shows nothing"
    assert bool(out.converged[0]), (
        f"best LR MSE {float(out.mse[0]):.2e} after {out.steps_run} steps"
    )
    return out


def test_pulse_finds_a_stylegan2_sample_within_eps():
    gen = tiny_stylegan2(16, seed=2)
    gen.set_gaussian_fit(gen.compute_gaussian_fit(samples=5000))
    out = pulse_recovers_own_sample(gen)
    assert float(out.mse[0]) <= 2e-4
