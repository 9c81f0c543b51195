"""Specification of the model catalogue, the cache folder and trust-on-first-use pins."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pulse_core.errors import ConfigError, ModelFileError
from pulse_core.generators import catalogue
from pulse_core.generators.cache import (
    cache_dir,
    default_cache_dir,
    pin_checksum,
    pinned_checksum,
    pins_path,
)
from pulse_core.generators.catalogue import (
    ModelEntry,
    ModelFile,
    combined_sha256,
    get_entry,
    import_model,
    list_models,
    pull,
    register,
    resolve,
)

STYLEGAN1 = "ffhq-1024-stylegan1-pulse"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache for this test, selected the way users select one: $PULSE_CACHE."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PULSE_CACHE", str(root))
    return root


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModelEntry]:
    """A private copy of the registry, so tests may register entries without leaking them."""
    copy = dict(catalogue._REGISTRY)
    monkeypatch.setattr(catalogue, "_REGISTRY", copy)
    return copy


@pytest.fixture
def stylegan1_folder(tmp_path: Path) -> Path:
    """Stand-ins for the PULSE files as a user downloads them (contents are not parsed here)."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "synthesis.pt").write_bytes(b"synthesis weights")
    (folder / "mapping.pt").write_bytes(b"mapping weights")
    (folder / "README.txt").write_bytes(b"not part of the model")
    return folder


# --------------------------------------------------------------------------------------------------
# Entries


def test_list_models_starts_with_the_demo() -> None:
    names = [entry.name for entry in list_models()]
    assert names[0] == "demo"
    assert STYLEGAN1 in names


def test_demo_entry_describes_the_wheel_checkpoint() -> None:
    entry = get_entry("demo")
    assert (entry.family, entry.resolution, entry.source) == ("dcgan", 64, "pypi")
    assert entry.package == "gan-face-generate==1.1.1"
    assert entry.main_file.sha256 == (
        "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"
    )
    assert "DigiFace-1M" in entry.licence and "non-commercial" in entry.licence


def test_stylegan1_entry_has_no_url_and_no_checksum() -> None:
    entry = get_entry(STYLEGAN1)
    assert (entry.family, entry.resolution) == ("stylegan1", 1024)
    assert [f.filename for f in entry.files] == ["synthesis.pt", "mapping.pt", "gaussian_fit.pt"]
    assert all(f.url is None and f.sha256 is None for f in entry.files)
    assert not entry.downloadable
    assert "pulse models import" in entry.notes


def test_unknown_name_lists_known_models_and_suggests_a_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'demo'") as caught:
        get_entry("dmeo")
    assert STYLEGAN1 in str(caught.value)


def test_a_fragment_of_a_name_is_suggested_too() -> None:
    with pytest.raises(ConfigError, match=f"did you mean '{STYLEGAN1}'"):
        get_entry("stylegan1")


def test_entry_with_an_unknown_family_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown family"):
        ModelEntry(
            name="x",
            family="biggan",  # type: ignore[arg-type]
            resolution=128,
            description="",
            licence="",
            source="url",
            files=(ModelFile("g.pt", url=None, sha256=None),),
        )


def test_a_name_is_registered_once(registry: dict[str, ModelEntry]) -> None:
    with pytest.raises(ConfigError, match="already in the catalogue"):
        register(get_entry("demo"))


# --------------------------------------------------------------------------------------------------
# Cache folder and pins


def test_cache_dir_honours_pulse_cache(cache: Path) -> None:
    assert cache_dir() == cache
    assert cache.is_dir()  # created on demand


def test_cache_dir_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PULSE_CACHE", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pulse-pipeline"


def test_cache_dir_defaults_to_dot_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "pulse-pipeline"


def test_cache_dir_on_macos_is_library_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "Library" / "Caches" / "pulse-pipeline"


def test_pin_is_recorded_and_read_back(cache: Path) -> None:
    digest = _sha(b"weights")
    assert pinned_checksum("m/g.pt") is None
    pin_checksum("m/g.pt", digest.upper())
    assert pinned_checksum("m/g.pt") == digest
    assert json.loads(pins_path().read_text())["pins"]["m/g.pt"]["sha256"] == digest


def test_a_different_checksum_does_not_replace_a_pin(cache: Path) -> None:
    pin_checksum("m/g.pt", _sha(b"first"))
    with pytest.raises(ModelFileError, match="pinned on first use"):
        pin_checksum("m/g.pt", _sha(b"second"))
    pin_checksum("m/g.pt", _sha(b"second"), replace=True)
    assert pinned_checksum("m/g.pt") == _sha(b"second")


def test_a_damaged_pins_file_is_reported_not_reset(cache: Path) -> None:
    pins_path().write_text("{not json")
    with pytest.raises(ModelFileError, match="damaged"):
        pinned_checksum("m/g.pt")


# --------------------------------------------------------------------------------------------------
# Import


def test_import_of_a_file_copies_it_and_pins_its_checksum(cache: Path, tmp_path: Path) -> None:
    source = tmp_path / "my-gan.pt"
    source.write_bytes(b"private weights")
    landed = import_model(source)
    assert landed == cache / "my-gan" / "my-gan.pt"
    assert landed.read_bytes() == b"private weights"
    assert pinned_checksum("my-gan/my-gan.pt") == _sha(b"private weights")
    assert not [p for p in cache.iterdir() if p.name.startswith(".import-")]  # no staging left


def test_imported_name_resolves_to_the_verified_file(cache: Path, tmp_path: Path) -> None:
    source = tmp_path / "g.pt"
    source.write_bytes(b"private weights")
    import_model(source, "mine")
    model = resolve("mine")
    assert model.path == cache / "mine" / "g.pt"
    assert model.sha256 == _sha(b"private weights")
    assert (model.family, model.entry) == (None, None)


def test_catalogue_folder_import_takes_the_entrys_files_and_pins_them(
    cache: Path, stylegan1_folder: Path
) -> None:
    landed = import_model(stylegan1_folder, STYLEGAN1)
    assert landed == cache / STYLEGAN1
    assert sorted(p.name for p in landed.iterdir() if not p.name.startswith(".")) == [
        "mapping.pt",
        "synthesis.pt",
    ]
    assert pinned_checksum(f"{STYLEGAN1}/synthesis.pt") == _sha(b"synthesis weights")
    assert pinned_checksum(f"{STYLEGAN1}/mapping.pt") == _sha(b"mapping weights")


def test_import_without_a_required_file_is_refused(cache: Path, stylegan1_folder: Path) -> None:
    (stylegan1_folder / "synthesis.pt").unlink()
    with pytest.raises(ModelFileError, match=r"missing synthesis\.pt"):
        import_model(stylegan1_folder, STYLEGAN1)
    assert not (cache / STYLEGAN1).exists()


def test_import_of_a_different_file_under_a_pinned_name_needs_force(
    cache: Path, stylegan1_folder: Path
) -> None:
    import_model(stylegan1_folder, STYLEGAN1)
    (stylegan1_folder / "synthesis.pt").write_bytes(b"other synthesis weights")
    with pytest.raises(ModelFileError, match="pinned with"):
        import_model(stylegan1_folder, STYLEGAN1)
    assert (cache / STYLEGAN1 / "synthesis.pt").read_bytes() == b"synthesis weights"
    import_model(stylegan1_folder, STYLEGAN1, force=True)
    assert pinned_checksum(f"{STYLEGAN1}/synthesis.pt") == _sha(b"other synthesis weights")


def test_import_against_a_published_checksum_refuses_other_bytes(
    cache: Path, tmp_path: Path
) -> None:
    source = tmp_path / "weights.tar"
    source.write_bytes(b"not the demo checkpoint")
    with pytest.raises(ModelFileError, match="published with"):
        import_model(source, "demo")
    assert not (cache / "demo").exists()


# --------------------------------------------------------------------------------------------------
# Resolve


def test_resolve_of_a_path_hashes_the_file(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "g.pt"
    path.write_bytes(b"weights")
    model = resolve(path)
    assert (model.name, model.path, model.sha256) == ("g.pt", path, _sha(b"weights"))
    assert model.entry is None
    assert not cache.exists()  # nothing written (not even the cache) for a user's own file


def test_a_local_copy_of_a_catalogue_file_is_recognised_by_checksum(
    tmp_path: Path, registry: dict[str, ModelEntry]
) -> None:
    path = tmp_path / "copy.pt"
    path.write_bytes(b"known weights")
    register(
        ModelEntry(
            name="known",
            family="stylegan2",
            resolution=256,
            description="",
            licence="",
            source="url",
            files=(ModelFile("g.pt", url=None, sha256=_sha(b"known weights")),),
        )
    )
    model = resolve(str(path))
    assert (model.family, model.resolution, model.entry) == ("stylegan2", 256, registry["known"])


def test_resolve_of_a_folder_uses_the_combined_digest(stylegan1_folder: Path) -> None:
    model = resolve(stylegan1_folder)
    assert model.path == stylegan1_folder
    assert model.sha256 == combined_sha256(
        {
            "README.txt": _sha(b"not part of the model"),
            "mapping.pt": _sha(b"mapping weights"),
            "synthesis.pt": _sha(b"synthesis weights"),
        }
    )


def test_combined_digest_is_the_sha256_of_a_sha256sum_listing() -> None:
    digests = {"b.pt": _sha(b"b"), "a.pt": _sha(b"a")}
    listing = f"{digests['a.pt']}  a.pt\n{digests['b.pt']}  b.pt\n"
    assert combined_sha256(digests) == _sha(listing.encode())


def test_an_existing_path_wins_over_a_catalogue_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "weights.tar").write_bytes(b"local")
    monkeypatch.chdir(tmp_path)
    model = resolve("demo")
    assert model.path == Path("demo")
    assert model.entry is None


def test_catalogue_name_resolves_to_its_cache_folder(cache: Path, stylegan1_folder: Path) -> None:
    import_model(stylegan1_folder, STYLEGAN1)
    model = resolve(STYLEGAN1)
    assert model.path == cache / STYLEGAN1
    assert (model.family, model.resolution) == ("stylegan1", 1024)
    assert model.entry is get_entry(STYLEGAN1)
    assert model.sha256 == combined_sha256(
        {"mapping.pt": _sha(b"mapping weights"), "synthesis.pt": _sha(b"synthesis weights")}
    )


def test_a_file_derived_in_the_cache_is_pinned_on_first_resolve(
    cache: Path, stylegan1_folder: Path
) -> None:
    import_model(stylegan1_folder, STYLEGAN1)
    (cache / STYLEGAN1 / "gaussian_fit.pt").write_bytes(b"fit")  # as a loader saves it
    model = resolve(STYLEGAN1)
    assert pinned_checksum(f"{STYLEGAN1}/gaussian_fit.pt") == _sha(b"fit")
    assert ("gaussian_fit.pt", _sha(b"fit")) in model.files


def test_a_derived_file_does_not_change_the_models_digest(
    cache: Path, stylegan1_folder: Path
) -> None:
    import_model(stylegan1_folder, STYLEGAN1)
    before = resolve(STYLEGAN1).sha256
    (cache / STYLEGAN1 / "gaussian_fit.pt").write_bytes(b"fit")  # computed from mapping.pt
    assert resolve(STYLEGAN1).sha256 == before


def test_without_its_source_a_derived_file_is_part_of_the_digest(
    cache: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "pulse-files"
    folder.mkdir()
    (folder / "synthesis.pt").write_bytes(b"synthesis weights")
    (folder / "gaussian_fit.pt").write_bytes(b"fit")
    import_model(folder, STYLEGAN1)
    assert resolve(STYLEGAN1).sha256 == combined_sha256(
        {"gaussian_fit.pt": _sha(b"fit"), "synthesis.pt": _sha(b"synthesis weights")}
    )


def test_import_of_a_copied_catalogue_file_defaults_to_its_name(
    cache: Path, tmp_path: Path, registry: dict[str, ModelEntry]
) -> None:
    register(
        ModelEntry(
            name="known",
            family="stylegan2",
            resolution=256,
            description="",
            licence="",
            source="url",
            files=(ModelFile("g.pt", url=None, sha256=_sha(b"known weights")),),
        )
    )
    source = tmp_path / "download (1).pt"
    source.write_bytes(b"known weights")
    assert import_model(source) == cache / "known" / "g.pt"


def test_a_cached_file_that_changed_is_refused(cache: Path, stylegan1_folder: Path) -> None:
    import_model(stylegan1_folder, STYLEGAN1)
    (cache / STYLEGAN1 / "synthesis.pt").write_bytes(b"tampered weights!")
    with pytest.raises(ModelFileError, match="corrupt or was replaced"):
        resolve(STYLEGAN1)


def test_model_missing_from_the_cache_says_how_to_pull_it(cache: Path) -> None:
    with pytest.raises(ModelFileError, match=r"not in the cache.*`pulse models pull demo`"):
        resolve("demo")


def test_model_without_url_missing_from_the_cache_says_how_to_import_it(cache: Path) -> None:
    with pytest.raises(ModelFileError, match=f"pulse models import PATH --name {STYLEGAN1}"):
        resolve(STYLEGAN1, allow_download=True)


def test_missing_file_path_is_a_model_file_error(cache: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        resolve("no/such/generator.pt")


def test_unknown_name_is_a_config_error(cache: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean"):
        resolve("dem")


# --------------------------------------------------------------------------------------------------
# Pull


def test_pull_of_a_model_without_url_explains_the_import(cache: Path) -> None:
    with pytest.raises(ModelFileError, match="cannot be downloaded automatically"):
        pull(STYLEGAN1)


@pytest.fixture
def http_base() -> Iterator[tuple[str, list[str]]]:
    """A 127.0.0.1 server of `/g.pt`; yields its base URL and the paths it was asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = b"downloaded weights"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_pull_of_a_url_model_pins_on_first_use_then_uses_the_cache(
    cache: Path, registry: dict[str, ModelEntry], http_base: tuple[str, list[str]]
) -> None:
    base, asked = http_base
    register(
        ModelEntry(
            name="remote",
            family="stylegan2",
            resolution=256,
            description="",
            licence="",
            source="url",
            files=(ModelFile("g.pt", url=f"{base}/g.pt", sha256=None),),
        )
    )
    progress: list[tuple[str, int, int | None]] = []
    path = pull("remote", progress=lambda *call: progress.append(call))
    assert path == cache / "remote" / "g.pt"
    assert pinned_checksum("remote/g.pt") == _sha(b"downloaded weights")
    assert progress[-1] == ("g.pt", 18, 18)
    assert pull("remote") == path
    assert asked == ["/g.pt"]  # the second pull found the verified file
    assert resolve("remote").sha256 == _sha(b"downloaded weights")


def test_hidden_files_are_not_part_of_a_folder_model(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "g.pt").write_bytes(b"w")
    (folder / "sub" / "fit.pt").write_bytes(b"f")
    (folder / ".g.pt.sha256.json").write_bytes(b"{}")  # our sidecars, locks, editors' files
    model = resolve(folder)
    assert [rel for rel, _ in model.files] == ["g.pt", "sub/fit.pt"]
