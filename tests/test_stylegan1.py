"""StyleGAN v1: the reference key layout, the authors' forward pass and search trajectory."""

from pathlib import Path

import pytest
import torch

from pulse_core.errors import ModelFileError
from pulse_core.generators.gaussian_fit import (
    FIT_SAMPLES,
    FIT_SEED,
    compute_gaussian_fit,
    fit_cache_path,
    load_gaussian_fit,
)
from pulse_core.generators.loading import load_generator_file
from pulse_core.generators.stylegan1 import (
    StyleGAN1Generator,
    StyleGAN1Mapping,
    StyleGAN1Synthesis,
    mapping_from_state_dict,
    synthesis_from_state_dict,
)
from pulse_core.search import InitialState, SearchConfig, search


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_1024_state_dict_has_the_reference_keys_and_shapes():
    sd = StyleGAN1Synthesis(1024).state_dict()
    assert len(sd) == 100
    assert sd["blocks.4x4.const"].shape == (1, 512, 4, 4)
    assert sd["blocks.4x4.bias"].shape == (512,)
    assert sd["blocks.64x64.conv0_up.weight"].shape == (256, 512, 3, 3)
    assert sd["blocks.1024x1024.conv1.weight"].shape == (16, 16, 3, 3)
    assert sd["blocks.128x128.conv0_up.intermediate.kernel"].shape == (1, 1, 3, 3)
    assert sd["blocks.8x8.epi1.style_mod.lin.weight"].shape == (1024, 512)
    assert sd["blocks.512x512.epi2.noise.weight"].shape == (32,)
    assert sd["torgb.weight"].shape == (3, 16, 1, 1)
    per_block = {"const", "bias", "conv.weight", "conv.bias"}
    assert {
        k.split(".", 2)[2] for k in sd if k.startswith("blocks.4x4.") and "epi" not in k
    } == per_block


def test_1024_state_dict_round_trips_through_a_file(tmp_path):
    net = StyleGAN1Synthesis(1024)
    torch.save(net.state_dict(), tmp_path / "synthesis.pt")
    again = synthesis_from_state_dict(_load(tmp_path / "synthesis.pt"))
    assert again.resolution == 1024
    for (k, a), (k2, b) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("resolution", [8, 16, 64, 256])
def test_any_power_of_two_resolution_builds_and_runs(resolution):
    net = StyleGAN1Synthesis(resolution, channels=None)
    n = net.num_layers
    assert n == 2 * (resolution.bit_length() - 1) - 2
    if resolution <= 64:
        noise = [torch.zeros(1, 1, 2 ** (i // 2 + 2), 2 ** (i // 2 + 2)) for i in range(n)]
        with torch.no_grad():
            out = net(torch.randn(1, n, 512), noise)
        assert out.shape == (1, 3, resolution, resolution)


def test_mapping_keys_match_the_reference():
    sd = StyleGAN1Mapping().state_dict()
    assert sorted(sd) == sorted([f"dense{i}.{p}" for i in range(8) for p in ("weight", "bias")])
    assert mapping_from_state_dict(sd).depth == 8


def test_wrong_file_is_refused_with_a_clear_error():
    with pytest.raises(ModelFileError, match=r"synthesis\.pt"):
        synthesis_from_state_dict({"foo": torch.zeros(1)})


def test_loader_matches_the_authors_forward_pass(reference_dir):
    net = synthesis_from_state_dict(_load(reference_dir / "synthesis-32.pt"))
    ref = _load(reference_dir / "synthesis-32.forward.pt")
    with torch.no_grad():
        out = net(ref["w"], ref["noise"])
    assert float((out - ref["image"]).abs().max()) < 1e-4


def test_reference_preset_reproduces_the_authors_search_trajectory(reference_dir):
    net = synthesis_from_state_dict(_load(reference_dir / "synthesis-32.pt"))
    t = _load(reference_dir / "search-32.trajectory.pt")
    gen = StyleGAN1Generator(net, t["gaussian_fit"]["mean"], t["gaussian_fit"]["std"]).freeze()
    config = SearchConfig.reference().with_(steps=t["steps"])
    out = search(gen, t["lr_image"], InitialState(t["latent0"], t["noise0"]), config)
    assert out.steps_run == t["steps"] == len(t["history"])
    for step, expected in enumerate(t["history"]):
        for term in ("L2", "GEOCROSS", "TOTAL"):
            ours = float(out.history[term][step, 0])
            assert ours == pytest.approx(expected[term], rel=1e-3), (step, term)
    # the last forward is the best iterate here (losses fall every step), so its image is ours
    assert int(out.best_step[0]) == t["steps"] - 1
    assert float((out.hr - t["last_image"]).abs().max()) < 1e-3


def test_authors_legacy_gaussian_fit_loads_on_cpu(reference_dir):
    fit = load_gaussian_fit(reference_dir / "gaussian_fit-ffhq-legacy.pt")
    assert fit.mean.shape == fit.std.shape == (512,)
    assert fit.mean.device.type == "cpu" and bool((fit.std > 0).all())


def test_cuda_tagged_legacy_gaussian_fit_written_here_loads_on_cpu(tmp_path, monkeypatch):
    path = tmp_path / "gaussian_fit.pt"
    data = {"mean": torch.randn(512), "std": torch.rand(512) + 0.1}
    # Tag the storages as cuda:0 the way a GPU machine would, in the legacy (non-zip) format.
    import torch.serialization as ser

    monkeypatch.setattr(ser, "location_tag", lambda storage: "cuda:0")
    torch.save(data, path, _use_new_zipfile_serialization=False)
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # proves the file really is cuda-tagged
    fit = load_gaussian_fit(path)
    assert torch.equal(fit.mean, data["mean"]) and torch.equal(fit.std, data["std"])


def test_gaussian_fit_computed_from_mapping_inverts_the_final_leaky_relu():
    torch.manual_seed(0)
    mapping = StyleGAN1Mapping(z_dim=16, w_dim=16, depth=2).eval()
    fit = compute_gaussian_fit(mapping, z_dim=16, samples=20_000, chunk=3_000)
    z = torch.randn(20_000, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = torch.nn.functional.leaky_relu(mapping(z), 5.0)
    assert torch.allclose(fit.mean, x.mean(0), atol=1e-4)
    assert torch.allclose(fit.std, x.std(0), atol=1e-4)
    assert bool((x < 0).any()), "the inverted activation must give negative values"


def test_folder_with_synthesis_and_mapping_computes_and_caches_the_fit(tmp_path, monkeypatch):
    import pulse_core.generators.loading as loading

    monkeypatch.setenv("PULSE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    # a small W (16) keeps the full 10^6-sample fit to a second
    torch.save(
        StyleGAN1Synthesis(16, channels=[8, 8, 8], w_dim=16).state_dict(), model / "synthesis.pt"
    )
    torch.save(StyleGAN1Mapping(z_dim=16, w_dim=16, depth=2).state_dict(), model / "mapping.pt")
    gen = load_generator_file(model)
    assert gen.family == "stylegan1" and gen.num_latents == 6 and gen.resolution == 16
    assert len(gen.checksum) == 64
    # kept by the sha256 of mapping.pt in the model cache, like every family's; not in the folder
    cached = fit_cache_path(loading.sha256_of(model / "mapping.pt"), FIT_SAMPLES, FIT_SEED)
    assert cached.is_file() and not (model / "gaussian_fit.pt").exists()
    assert torch.equal(load_gaussian_fit(cached).mean, gen.fit_mean)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached fit should have been used")

    monkeypatch.setattr(loading, "compute_gaussian_fit", must_not_run)
    again = load_generator_file(model)
    assert torch.equal(again.fit_mean, gen.fit_mean) and torch.equal(again.fit_std, gen.fit_std)


def test_a_shipped_gaussian_fit_beside_the_weights_is_used_as_is(tmp_path):
    fit = {"mean": torch.randn(16), "std": torch.rand(16) + 0.5}
    torch.save(
        StyleGAN1Synthesis(8, channels=[8, 8], w_dim=16).state_dict(), tmp_path / "synthesis.pt"
    )
    torch.save(fit, tmp_path / "gaussian_fit.pt")
    gen = load_generator_file(tmp_path)
    assert torch.equal(gen.fit_mean, fit["mean"]) and torch.equal(gen.fit_std, fit["std"])
