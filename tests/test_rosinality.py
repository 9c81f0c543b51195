"""rosinality/stylegan2-pytorch checkpoints: every tensor mapped, the forward pass equal to an
independent re-statement of rosinality's `model.py` math, and PULSE on the loaded network.

The reference below follows rosinality's definitions, not ours: `upfirdn2d_native` (zero
insertion, padding, convolution with the flipped kernel), `ModulatedConv2d` (weight scaled by
1/sqrt(fan_in) then modulated, demodulated, one grouped conv or a grouped transposed conv followed
by `Blur(pad=(1, 1))` with the kernel x4), `NoiseInjection`, `FusedLeakyReLU`, `ToRGB` with
`Upsample` (pad (2, 1), kernel x4) of the skip image, and the latent indexing of `Generator`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pulse_core.errors import ModelFileError
from pulse_core.generators.gaussian_fit import (
    FIT_SAMPLES,
    FIT_SEED,
    fit_cache_path,
    store_cached_fit,
)
from pulse_core.generators.loading import load_generator_file, sha256_of
from pulse_core.generators.rosinality import (
    from_checkpoint,
    is_rosinality_checkpoint,
    load_rosinality_checkpoint,
    rosinality_key_map,
)
from pulse_core.generators.stylegan2 import StyleGAN2Generator
from tests.test_stylegan2 import pulse_recovers_own_sample

SQRT2 = math.sqrt(2.0)
KERNEL = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64 * 4

# ----------------------------------------------------------------------------
# Writing rosinality-layout checkpoints


def rosinality_state(
    size: int = 16,
    style_dim: int = 10,
    n_mlp: int = 3,
    channels: dict[int, int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random `Generator(size, style_dim, n_mlp).state_dict()` in rosinality's key layout."""
    g = torch.Generator().manual_seed(seed)
    chans = channels or {4: 16, 8: 16, 16: 8, 32: 8, 64: 8}

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd: dict[str, torch.Tensor] = {}
    for i in range(1, n_mlp + 1):
        sd[f"style.{i}.weight"] = randn(style_dim, style_dim) / 0.01
        sd[f"style.{i}.bias"] = randn(style_dim, scale=30.0)

    def styled_conv(prefix: str, cin: int, cout: int, up: bool) -> None:
        sd[f"{prefix}.conv.weight"] = randn(1, cout, cin, 3, 3)
        sd[f"{prefix}.conv.modulation.weight"] = randn(cin, style_dim)
        sd[f"{prefix}.conv.modulation.bias"] = 1 + randn(cin, scale=0.1)
        if up:
            sd[f"{prefix}.conv.blur.kernel"] = KERNEL.clone()
        sd[f"{prefix}.noise.weight"] = randn(1, scale=0.3)
        sd[f"{prefix}.activate.bias"] = randn(cout, scale=0.3)

    def to_rgb(prefix: str, cin: int, up: bool) -> None:
        if up:
            sd[f"{prefix}.upsample.kernel"] = KERNEL.clone()
        sd[f"{prefix}.conv.weight"] = randn(1, 3, cin, 1, 1, scale=0.5)
        sd[f"{prefix}.conv.modulation.weight"] = randn(cin, style_dim)
        sd[f"{prefix}.conv.modulation.bias"] = 1 + randn(cin, scale=0.1)
        sd[f"{prefix}.bias"] = randn(1, 3, 1, 1, scale=0.3)

    sd["input.input"] = randn(1, chans[4], 4, 4)
    styled_conv("conv1", chans[4], chans[4], up=False)
    to_rgb("to_rgb1", chans[4], up=False)
    log_size = int(math.log2(size))
    for layer in range((log_size - 2) * 2 + 1):
        r = 2 ** ((layer + 5) // 2)
        sd[f"noises.noise_{layer}"] = randn(1, 1, r, r)
    cin = chans[4]
    for k, i in enumerate(range(3, log_size + 1)):
        cout = chans[2**i]
        styled_conv(f"convs.{2 * k}", cin, cout, up=True)
        styled_conv(f"convs.{2 * k + 1}", cout, cout, up=False)
        to_rgb(f"to_rgbs.{k}", cout, up=True)
        cin = cout
    return sd


def rosinality_checkpoint(size: int = 16, seed: int = 0, **kwargs) -> dict:
    state = rosinality_state(size, seed=seed, **kwargs)
    style_dim = state["style.1.weight"].shape[1]
    return {
        "g_ema": state,
        "latent_avg": torch.randn(style_dim, generator=torch.Generator().manual_seed(9)),
    }


# ----------------------------------------------------------------------------
# Independent reference of rosinality's forward pass


def ros_upfirdn2d(x, kernel, up=1, pad=(0, 0)):
    n, c, h, w = x.shape
    z = x.new_zeros(n, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [pad[0], pad[1], pad[0], pad[1]])
    k = kernel.flip(0, 1)[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(z, k, groups=c)


def ros_linear(x, weight, bias, lr_mul=1.0, act=False):
    scale = (1 / math.sqrt(weight.shape[1])) * lr_mul
    if act:
        return F.leaky_relu(F.linear(x, weight * scale) + bias * lr_mul, 0.2) * SQRT2
    return F.linear(x, weight * scale, bias=bias * lr_mul)


def ros_modconv(sd, p, x, style, demodulate=True, upsample=False):
    batch, cin, h, w = x.shape
    weight = sd[p + "conv.weight"]
    _, cout, _, k, _ = weight.shape
    s = ros_linear(style, sd[p + "conv.modulation.weight"], sd[p + "conv.modulation.bias"])
    wt = (1 / math.sqrt(cin * k * k)) * weight * s.view(batch, 1, cin, 1, 1)
    if demodulate:
        wt = wt * torch.rsqrt(wt.pow(2).sum([2, 3, 4]) + 1e-8).view(batch, cout, 1, 1, 1)
    if upsample:
        wt = wt.transpose(1, 2).reshape(batch * cin, cout, k, k)
        out = F.conv_transpose2d(x.view(1, batch * cin, h, w), wt, stride=2, groups=batch)
        out = out.view(batch, cout, *out.shape[2:])
        return ros_upfirdn2d(out, sd[p + "conv.blur.kernel"], pad=(1, 1))
    out = F.conv2d(
        x.view(1, batch * cin, h, w), wt.view(batch * cout, cin, k, k), padding=k // 2, groups=batch
    )
    return out.view(batch, cout, h, w)


def ros_styled_conv(sd, p, x, style, noise, upsample=False):
    out = ros_modconv(sd, p, x, style, upsample=upsample)
    out = out + sd[p + "noise.weight"] * noise
    return F.leaky_relu(out + sd[p + "activate.bias"].view(1, -1, 1, 1), 0.2) * SQRT2


def ros_to_rgb(sd, p, x, style, skip=None):
    out = ros_modconv(sd, p, x, style, demodulate=False) + sd[p + "bias"]
    if skip is not None:
        out = out + ros_upfirdn2d(skip, sd[p + "upsample.kernel"], up=2, pad=(2, 1))
    return out


def ros_generator(sd, latent, noise):
    """rosinality's `Generator.forward(input_is_latent=True, noise=noise)` image."""
    out = sd["input.input"].repeat(latent.shape[0], 1, 1, 1)
    out = ros_styled_conv(sd, "conv1.", out, latent[:, 0], noise[0])
    skip = ros_to_rgb(sd, "to_rgb1.", out, latent[:, 1])
    i, k = 1, 0
    while f"to_rgbs.{k}.conv.weight" in sd:
        out = ros_styled_conv(sd, f"convs.{2 * k}.", out, latent[:, i], noise[i], upsample=True)
        out = ros_styled_conv(sd, f"convs.{2 * k + 1}.", out, latent[:, i + 1], noise[i + 1])
        skip = ros_to_rgb(sd, f"to_rgbs.{k}.", out, latent[:, i + 2], skip)
        i, k = i + 2, k + 1
    return skip


def ros_mapping(sd, z, n_mlp, lr_mlp=0.01):
    x = z * torch.rsqrt(torch.mean(z**2, dim=1, keepdim=True) + 1e-8)
    for i in range(1, n_mlp + 1):
        x = ros_linear(x, sd[f"style.{i}.weight"], sd[f"style.{i}.bias"], lr_mlp, act=True)
    return x


# ----------------------------------------------------------------------------


def test_every_tensor_of_the_checkpoint_maps_onto_a_distinct_tensor_of_ours():
    ckpt = rosinality_checkpoint(32)
    keys = rosinality_key_map(ckpt["g_ema"])
    assert set(keys) == set(ckpt["g_ema"])
    assert len(set(keys.values())) == len(keys)
    gen = from_checkpoint(ckpt)
    ours = set(gen.state_dict())
    assert set(keys.values()) <= ours
    # what is ours but not in the file: w_avg (from latent_avg) and the resample filters of
    # layers that do not resample, which NVIDIA's layout stores everywhere
    derived = ours - set(keys.values())
    assert derived == {"mapping.w_avg"} | {
        k for k in derived if k.endswith("resample_filter") and ("b4." in k or ".conv1." in k)
    }
    assert torch.equal(gen.synthesis.b8.conv0.resample_filter, KERNEL / 4)
    assert torch.equal(gen.mapping.w_avg, ckpt["latent_avg"])


@pytest.mark.parametrize("size", [4, 16, 32])
@pytest.mark.parametrize("fused", [False, True])
def test_forward_equals_rosinalitys(size, fused):
    ckpt = rosinality_checkpoint(size, seed=size)
    gen = from_checkpoint(ckpt).freeze()
    gen.synthesis.set_fused_modconv(fused)
    torch.manual_seed(0)
    latent = torch.randn(2, gen.num_latents, gen.latent_dim)
    noise = [torch.randn(2, 1, h, w) for h, w in gen.noise_shapes]
    with torch.no_grad():
        ours = gen.synthesize(latent, noise)
        ref = ros_generator(ckpt["g_ema"], latent, noise)
    assert ours.shape == (2, 3, size, size)
    assert float((ours - ref).abs().max()) < 1e-5


def test_mapping_equals_rosinalitys_style_network():
    ckpt = rosinality_checkpoint(8)
    gen = from_checkpoint(ckpt).freeze()
    z = torch.randn(5, gen.z_dim)
    with torch.no_grad():
        assert torch.allclose(
            gen.mapping(z), ros_mapping(ckpt["g_ema"], z, 3), atol=1e-5, rtol=1e-5
        )


def test_stored_noise_buffers_become_the_const_noise():
    ckpt = rosinality_checkpoint(16)
    gen = from_checkpoint(ckpt)
    stored = [ckpt["g_ema"][f"noises.noise_{i}"] for i in range(len(gen.noise_shapes))]
    assert all(torch.equal(a, b) for a, b in zip(gen.const_noise(), stored, strict=True))


def test_channel_counts_are_read_from_the_tensors():
    ckpt = rosinality_checkpoint(32, channels={4: 12, 8: 10, 16: 6, 32: 4})
    gen = from_checkpoint(ckpt)
    assert gen.synthesis.channels == {4: 12, 8: 10, 16: 6, 32: 4}
    assert gen.resolution == 32 and gen.num_latents == 8


def test_a_checkpoint_without_latent_avg_has_no_w_avg():
    ckpt = rosinality_checkpoint(8)
    del ckpt["latent_avg"]
    gen = from_checkpoint(ckpt)
    assert "mapping.w_avg" not in gen.state_dict()


def test_an_unknown_tensor_is_refused_with_its_name():
    ckpt = rosinality_checkpoint(8)
    ckpt["g_ema"]["convs.0.conv.extra"] = torch.zeros(1)
    with pytest.raises(ModelFileError, match=r"convs\.0\.conv\.extra"):
        from_checkpoint(ckpt)


def test_a_missing_tensor_is_refused_with_its_name():
    ckpt = rosinality_checkpoint(8)
    del ckpt["g_ema"]["noises.noise_2"]
    with pytest.raises(ModelFileError, match=r"missing 1 .*b8\.conv1\.noise_const"):
        from_checkpoint(ckpt)


def test_gaussian_fit_inverts_fused_leaky_relu():
    ckpt = rosinality_checkpoint(8)
    gen = from_checkpoint(ckpt)
    fit = gen.compute_gaussian_fit(samples=2000, seed=3)
    z = torch.randn(2000, gen.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = F.leaky_relu(ros_mapping(ckpt["g_ema"], z, 3) / SQRT2, 5.0).double()
    assert torch.allclose(fit.mean.double(), x.mean(0), atol=1e-4, rtol=1e-5)
    assert torch.allclose(fit.std.double(), x.std(0), atol=1e-4, rtol=1e-5)


def test_load_generator_file_recognises_a_rosinality_checkpoint(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PULSE_CACHE", str(tmp_path / "cache"))
    ckpt = rosinality_checkpoint(8)
    path = tmp_path / "stylegan2-tiny.pt"
    torch.save(ckpt, path)
    assert is_rosinality_checkpoint(ckpt)
    # a fit already cached for these bytes is used (the full 1e6-sample fit is not recomputed)
    small = from_checkpoint(ckpt).compute_gaussian_fit(samples=500)
    store_cached_fit(small, sha256_of(path), FIT_SAMPLES, FIT_SEED)
    assert fit_cache_path(sha256_of(path), FIT_SAMPLES, FIT_SEED).is_file()
    gen = load_generator_file(path)
    assert isinstance(gen, StyleGAN2Generator) and gen.model_id == "stylegan2-tiny"
    assert torch.equal(gen.fit_mean, small.mean) and torch.equal(gen.fit_std, small.std)


def test_pulse_finds_a_sample_of_a_rosinality_network_within_eps():
    gen = load_rosinality_checkpoint(
        rosinality_checkpoint(16, seed=2), fit_samples=5000, use_fit_cache=False
    )
    out = pulse_recovers_own_sample(gen.freeze())
    assert float(out.mse[0]) <= 2e-4
