"""The model cache: where generator files live on this machine, and the checksums pinned for them.

Layout (`cache_dir()`):

    <cache>/<model name>/<files>        one folder per model (catalogue name or imported name)
    <cache>/pins.json                   trust-on-first-use sha256 pins, by key "<model>/<file>"
    <cache>/.locks/<key>.lock           advisory locks: one writer per model at a time

Why pins: some weights (the PULSE StyleGAN files) have no published checksum. The first time we
see them we record their digest; from then on a file that differs (corrupt copy, swapped file) is
refused instead of silently producing different restorations. The pins file is small JSON, written
atomically under a lock, and is never reset silently: losing it means losing that protection.

Why a verified-digest sidecar (`.<file>.sha256.json`): re-hashing hundreds of MB on every load
costs seconds per worker. A digest recorded with the file's size and mtime is reused while both
are unchanged; any change to the file forces a new hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

# atomic_write_bytes / atomic_write_text are re-exported: catalogue and demo import them from here.
from pulse_core.atomic import atomic_write_bytes as atomic_write_bytes
from pulse_core.atomic import atomic_write_text
from pulse_core.errors import ModelFileError
from pulse_core.generators.download import normalise_sha256, sha256_file

try:  # POSIX advisory locks; elsewhere locking is a no-op (documented in `file_lock`)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

ENV_VAR = "PULSE_CACHE"  # overrides the cache location (shared volumes, tests, read-only homes)
APP_NAME = "pulse-pipeline"
PINS_FILE = "pins.json"
PINS_FORMAT = 1  # bump when the pins file layout changes


def default_cache_dir() -> Path:
    """The per-user cache folder of this platform, ignoring `$PULSE_CACHE`."""
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / APP_NAME
    if sys.platform == "win32":  # pragma: no cover - not a supported worker platform
        local = os.environ.get("LOCALAPPDATA")
        return (Path(local) if local else home / "AppData" / "Local") / APP_NAME / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".cache"
    return base / APP_NAME


def cache_dir(*, create: bool = True) -> Path:
    """`$PULSE_CACHE` if set, else the user's cache folder; created on demand."""
    override = os.environ.get(ENV_VAR, "").strip()
    root = Path(override).expanduser() if override else default_cache_dir()
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelFileError(
                f"cannot create the model cache {root}: {exc}; set {ENV_VAR} to a writable folder"
            ) from exc
    return root


# --------------------------------------------------------------------------------------------------
# Locks (atomic writes: `pulse_core.atomic`)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the block.

    Serialises writers of one model across processes (several Dask workers pulling the same
    weights). flock locks belong to an open file, so the same process taking the same lock twice
    through two calls deadlocks: never nest `file_lock` on one path. Without fcntl (Windows) this
    is a no-op, which is safe for a single writer.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lock_path(key: str, cache: Path | None = None) -> Path:
    """The lock file guarding writes of `key` (a model name) in the cache."""
    root = cache if cache is not None else cache_dir()
    return root / ".locks" / f"{key.replace('/', '__')}.lock"


# --------------------------------------------------------------------------------------------------
# Trust-on-first-use pins


def pins_path(cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_dir()) / PINS_FILE


def _read_pins(path: Path) -> dict[str, dict[str, str]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ModelFileError(f"cannot read the checksum pins {path}: {exc}") from exc
    try:
        data = json.loads(raw)
        pins = data["pins"]
        if not isinstance(pins, dict) or not all(isinstance(v, dict) for v in pins.values()):
            raise TypeError("'pins' must map keys to objects")
    except (ValueError, KeyError, TypeError) as exc:
        # Never reset silently: the pins are the only record of what the first download was.
        raise ModelFileError(
            f"the checksum pins file {path} is damaged ({exc}); repair it, or delete it to "
            "forget every trust-on-first-use checksum"
        ) from exc
    return pins


def pinned_checksum(name: str, *, cache: Path | None = None) -> str | None:
    """The sha256 pinned for `name` (usually "<model>/<file>"), or None if never pinned."""
    entry = _read_pins(pins_path(cache)).get(name)
    return entry.get("sha256") if entry else None


def pin_checksum(
    name: str,
    sha256: str,
    *,
    cache: Path | None = None,
    replace: bool = False,
) -> str:
    """Record `sha256` for `name` unless a different one is pinned; returns the digest now pinned.

    A conflicting pin raises ModelFileError: that is the moment trust on first use exists for (a
    file changed after we first trusted it). `replace=True` is the user's explicit override
    (e.g. `pulse models import --force` of a deliberately different file).
    """
    digest = normalise_sha256(sha256)
    path = pins_path(cache)
    with file_lock(path.with_name(path.name + ".lock")):
        pins = _read_pins(path)
        current = pins.get(name, {}).get("sha256")
        if current == digest:
            return digest
        if current is not None and not replace:
            raise ModelFileError(
                f"{name}: sha256 {digest} differs from the checksum pinned on first use "
                f"({current}, in {path}). If the new file is intended, import it again with "
                "--force; otherwise the file is corrupt or was swapped: do not use it."
            )
        pins[name] = {
            "sha256": digest,
            "pinned_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        document = {"format": PINS_FORMAT, "pins": dict(sorted(pins.items()))}
        atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return digest


# --------------------------------------------------------------------------------------------------
# Verified digests of cached files


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256.json")


def record_verified(path: Path, sha256: str) -> None:
    """Remember that `path`, as it is now (size, mtime), hashes to `sha256`."""
    stat = path.stat()
    record = {
        "sha256": normalise_sha256(sha256),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    with contextlib.suppress(OSError):  # a read-only cache only costs re-hashing next time
        atomic_write_text(_sidecar(path), json.dumps(record) + "\n")


def verified_sha256(path: Path) -> str:
    """The sha256 of a cached file, reusing the recorded digest while size and mtime are unchanged.

    Meant for files inside the cache only (it writes a hidden sidecar beside `path`); user files
    elsewhere are hashed with `sha256_file`.
    """
    stat = path.stat()
    try:
        record = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return normalise_sha256(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError, ModelFileError):
        pass
    digest = sha256_file(path)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):
        record_verified(path, digest)  # not if the file changed while it was being hashed
    return digest


def forget_verified(path: Path) -> None:
    """Drop the recorded digest of `path` (before deleting or replacing it)."""
    _sidecar(path).unlink(missing_ok=True)
