"""The StyleGAN v1 fast path computes what the plain formulation of pulse-reference.md section 8 does.

`plain_synthesis` below restates the reference step by step (nearest upsample + 3x3 conv, or the
fused transposed conv from 128 px; the blur; + bias; noise, LeakyReLU, instance norm, style) from
the network's own parameters, independently of the module's code. Small channel counts keep it
fast; resolution 256 hits both upsampling paths (8..64 nearest, 128..256 fused).
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from pulse_core.generators.stylegan1 import (
    EqualConv2d,
    StyleGAN1Generator,
    StyleGAN1Synthesis,
    _FusedEpilogue,
)
from pulse_core.search import InitialState, SearchConfig, search

# `pulse_core.downscale` the attribute is the function the package re-exports; the module:
ds = sys.modules["pulse_core.downscale"]

W_DIM = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Numerics only: one thread keeps these tiny ops fast on a busy machine (parallel regions
    wait on descheduled OpenMP workers there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHANNELS = [8, 8, 6, 6, 4, 4, 3]  # 4x4 .. 256x256


def plain_synthesis(net: StyleGAN1Synthesis, w: torch.Tensor, noise: list[torch.Tensor]):
    sd = net.state_dict()
    sqrt2 = 2.0**0.5

    def dense(prefix, x):
        weight, bias = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
        return F.linear(x, weight * weight.shape[1] ** -0.5, bias)

    def conv_weight(prefix):
        weight = sd[f"{prefix}.weight"]
        return weight * sqrt2 * (weight[0].numel()) ** -0.5

    def epilogue(prefix, x, w_i, noise_i):
        x = x + sd[f"{prefix}.noise.weight"].view(1, -1, 1, 1) * noise_i
        x = F.leaky_relu(x, 0.2)
        x = F.instance_norm(x, eps=1e-5)
        s = dense(f"{prefix}.style_mod.lin", w_i).view(-1, 2, x.shape[1], 1, 1)
        return x * (s[:, 0] + 1.0) + s[:, 1]

    def conv0_up(prefix, x):
        weight = conv_weight(prefix)
        if x.shape[2] * 2 >= 128:  # fused: 4x4 kernel from the four shifts, transposed conv
            k = F.pad(weight.permute(1, 0, 2, 3), (1, 1, 1, 1))
            k = k[:, :, 1:, 1:] + k[:, :, :-1, 1:] + k[:, :, 1:, :-1] + k[:, :, :-1, :-1]
            x = F.conv_transpose2d(x, k, stride=2, padding=1)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = F.conv2d(x, weight, padding=1)
        blur = sd[f"{prefix}.intermediate.kernel"]
        x = F.conv2d(x, blur.expand(x.shape[1], 1, 3, 3), padding=1, groups=x.shape[1])
        return x + sd[f"{prefix}.bias"].view(1, -1, 1, 1)

    b = w.shape[0]
    x = sd["blocks.4x4.const"].expand(b, -1, -1, -1) + sd["blocks.4x4.bias"].view(1, -1, 1, 1)
    x = epilogue("blocks.4x4.epi1", x, w[:, 0], noise[0])
    x = F.conv2d(x, conv_weight("blocks.4x4.conv"), sd["blocks.4x4.conv.bias"], padding=1)
    x = epilogue("blocks.4x4.epi2", x, w[:, 1], noise[1])
    for i, name in enumerate(list(net.blocks)[1:], start=1):
        p = f"blocks.{name}"
        x = conv0_up(f"{p}.conv0_up", x)
        x = epilogue(f"{p}.epi1", x, w[:, 2 * i], noise[2 * i])
        x = F.conv2d(x, conv_weight(f"{p}.conv1"), sd[f"{p}.conv1.bias"], padding=1)
        x = epilogue(f"{p}.epi2", x, w[:, 2 * i + 1], noise[2 * i + 1])
    rgb = sd["torgb.weight"]
    return F.conv2d(x, rgb * rgb[0].numel() ** -0.5, sd["torgb.bias"])


def _random_net(resolution=256, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = StyleGAN1Synthesis(
        resolution, channels=CHANNELS[: resolution.bit_length() - 2], w_dim=W_DIM
    )
    with torch.no_grad():  # non-trivial biases and noise strengths (they start at 0 / 1)
        for name, p in net.named_parameters():
            if name.endswith("bias") or name.endswith("noise.weight"):
                p.normal_(0.0, 0.3)
    net = net.to(dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _inputs(net, batch=2, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = net.num_layers
    w = torch.randn(batch, n, W_DIM, generator=g, dtype=dtype)
    noise = [
        torch.randn(batch, 1, 2 ** (i // 2 + 2), 2 ** (i // 2 + 2), generator=g, dtype=dtype)
        for i in range(n)
    ]
    return w, noise


def test_fast_forward_equals_the_plain_formulation_on_both_upsampling_paths():
    net = _random_net()
    w, noise = _inputs(net)
    assert net.fast_path
    with torch.no_grad():
        fast = net(w, noise)
        plain = plain_synthesis(net, w, noise)
        module_ref = net.use_fast_path(False)(w, noise)
    assert fast.shape == (2, 3, 256, 256) and fast.is_contiguous()
    scale = float(plain.abs().max())
    assert float((fast - plain).abs().max()) < 1e-10 * scale  # same math (float64)
    assert float((module_ref - plain).abs().max()) < 1e-10 * scale


def test_fast_forward_in_float32_stays_within_rounding():
    net = _random_net(dtype=torch.float32)
    w, noise = _inputs(net, dtype=torch.float32)
    with torch.no_grad():
        fast = net(w, noise)
        plain = plain_synthesis(net, w, noise)
    assert float((fast - plain).abs().max()) < 2e-5 * float(plain.abs().max())


def test_fast_gradients_wrt_latents_and_noise_equal_the_plain_ones():
    net = _random_net(resolution=128)
    w, noise = _inputs(net)
    w.requires_grad_(True)
    for m in noise[:5]:
        m.requires_grad_(True)
    target = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3), dtype=w.dtype)
    grads = []
    for fn in (net, lambda w_, n_: plain_synthesis(net, w_, n_)):
        (fn(w, noise) * target).sum().backward()
        grads.append([w.grad.clone()] + [m.grad.clone() for m in noise[:5]])
        w.grad = None
        for m in noise[:5]:
            m.grad = None
    for fast, plain in zip(*grads, strict=True):
        assert torch.allclose(fast, plain, rtol=1e-9, atol=1e-12)


def test_fused_epilogue_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    noise = torch.randn(2, 1, 5, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    nw = torch.randn(3, dtype=torch.float64, generator=g)
    style = torch.randn(2, 2, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    for inp in (x, cl):
        assert torch.autograd.gradcheck(
            lambda a, b, s: _FusedEpilogue.apply(a, b, nw, s, 1e-5), (inp, noise, style)
        )


@pytest.mark.parametrize("side_in", [16, 64])  # output 32: nearest path; output 128: fused path
def test_upsampling_conv_equals_upsample_conv_blur_bias(side_in):
    torch.manual_seed(side_in)
    conv = EqualConv2d(5, 4, 3, upsample=True).double()
    with torch.no_grad():
        conv.bias.normal_()
        conv.intermediate.kernel.copy_(torch.rand(1, 1, 3, 3))  # the stored kernel is used
    for p in conv.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 5, side_in, side_in, dtype=torch.float64)
    w = conv.weight * conv.w_mul
    if side_in * 2 >= 128:
        k = F.pad(w.permute(1, 0, 2, 3), (1, 1, 1, 1))
        k = k[:, :, 1:, 1:] + k[:, :, :-1, 1:] + k[:, :, 1:, :-1] + k[:, :, :-1, :-1]
        y = F.conv_transpose2d(x, k, stride=2, padding=1)
    else:
        y = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    y = F.conv2d(y, conv.intermediate.kernel.expand(4, 1, 3, 3), padding=1, groups=4)
    y = y + conv.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(conv(x), y, rtol=1e-12, atol=1e-12)
        assert torch.allclose(conv(x.contiguous(memory_format=torch.channels_last)), y, atol=1e-12)


def test_state_dict_layout_is_unchanged_by_the_fast_path_and_its_cache():
    net = StyleGAN1Synthesis(1024)
    keys = list(net.state_dict())
    assert len(keys) == 100
    small = _random_net(dtype=torch.float32)
    before = list(small.state_dict())
    w, noise = _inputs(small, dtype=torch.float32)
    with torch.no_grad():
        small(w, noise)  # builds the derived-tensor caches
    assert list(small.state_dict()) == before
    assert all("cache" not in k for k in before)


def test_cache_follows_load_state_dict():
    net = _random_net(seed=0)
    other = _random_net(seed=5)
    w, noise = _inputs(net)
    with torch.no_grad():
        first = net(w, noise)
        net.load_state_dict(other.state_dict(), strict=True)
        again = net(w, noise)
        expected = plain_synthesis(other, w, noise)
    assert not torch.allclose(first, again)
    assert torch.allclose(again, expected, rtol=1e-10, atol=1e-12)


def test_trainable_weights_get_the_same_gradients_as_the_plain_code():
    net = _random_net(resolution=32)
    for p in net.parameters():
        p.requires_grad_(True)
    w, noise = _inputs(net)
    params = dict(net.named_parameters())
    grads = []
    for fast in (True, False):  # plain_synthesis reads detached tensors: compare with the module's
        net.use_fast_path(fast)  # own reference code, which test 1 ties to plain_synthesis
        net(w, noise).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
        net.zero_grad(set_to_none=True)
    scale = max(float(g.abs().max()) for g in grads[1].values())
    for k in params:  # (some are ~0 but for rounding: a bias right before an instance norm)
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-12 * scale), k


def test_search_with_fast_and_plain_paths_follows_the_same_trajectory():
    net = _random_net(resolution=64, dtype=torch.float32)
    gen = StyleGAN1Generator(net, torch.zeros(W_DIM), torch.ones(W_DIM)).freeze()
    w, noise = _inputs(net, batch=1, dtype=torch.float32)
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    config = SearchConfig.reference().with_(steps=5)
    runs = []
    for fast in (True, False):
        net.use_fast_path(fast)
        runs.append(search(gen, target, InitialState(w, noise), config))
    for term in ("L2", "GEOCROSS", "TOTAL"):
        assert torch.allclose(runs[0].history[term], runs[1].history[term], rtol=1e-4)


@pytest.mark.parametrize(("size", "factor"), [(64, 2), (64, 4), (96, 3), (128, 32)])
def test_downscale_matrix_form_equals_the_padded_strided_conv(monkeypatch, size, factor):
    x = torch.rand(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    fast = ds.downscale(x, factor)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    monkeypatch.setattr(ds, "_MATMUL_MAX_ENTRIES", 0)  # force the conv formulation
    conv = ds.downscale(x, factor)
    (g_conv,) = torch.autograd.grad(conv.square().sum(), x)
    assert torch.allclose(fast, conv, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_fast, g_conv, rtol=1e-12, atol=1e-12)
