"""HTTP(S) download of model files: resumable, checksummed, landed atomically.

Generator weights are hundreds of megabytes fetched over links we do not control, onto batch
machines that may be killed at any moment. So a download:

- streams into `<dest>.part` and keeps it when the connection drops, so the next attempt (or the
  next run) continues with an HTTP Range request instead of starting again;
- lands at `dest` only by an fsynced `os.replace` (`pulse_core.atomic.replace_file`) after a
  sha256 check, so `dest` is either absent or complete and verified, never a truncated or corrupt
  file a loader could trip over later. The `.part` name, not the atomic writer's temp name, is
  deliberate: it must be found again by the next attempt to resume;
- retries transient failures (timeouts, resets, 5xx, 429) a bounded number of times with
  exponential backoff, and fails at once with an actionable message on permanent ones (404, 403);
- when no checksum is published (`sha256=None`), computes it and returns it so the caller can pin
  it (trust on first use, see `pulse_core.generators.cache.pin_checksum`).

Only the standard library is used: the download path must work in a bare worker image.
This module does no locking: two processes writing the same `dest` would interleave their `.part`
writes, so callers that may run concurrently hold `cache.file_lock` around `download`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import random
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from importlib import metadata
from pathlib import Path
from typing import IO

# fsync_dir and new_file_mode are re-exported: catalogue and demo import them from here.
from pulse_core.atomic import fsync_dir as fsync_dir
from pulse_core.atomic import new_file_mode as new_file_mode
from pulse_core.atomic import replace_file
from pulse_core.errors import ModelFileError

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None when unknown)

CHUNK_BYTES = 1 << 20  # 1 MiB: large enough for throughput, small enough for smooth progress
MAX_BACKOFF_S = 30.0  # cap of one wait between attempts, Retry-After included
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class DownloadResult:
    """What landed at `path`, and how much trust the caller can place in it."""

    path: Path  # the final file (== the `dest` argument)
    sha256: str  # hex digest of the file at `path`, always computed from the bytes on disk
    size: int  # bytes
    verified: bool  # True: matched the given sha256; False: none given (trust on first use)
    resumed: bool  # True when bytes of an earlier partial download were kept
    attempts: int  # HTTP requests made; 0 = `dest` already held the expected file


def sha256_file(path: Path, *, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB checkpoints never sit in memory."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def normalise_sha256(value: str) -> str:
    """Lower-case hex digest; published checksums come in either case, comparisons must not care."""
    digest = value.strip().lower()
    if not _SHA256_RE.match(digest):
        raise ModelFileError(f"not a sha256 hex digest (64 hex characters): {value!r}")
    return digest


def part_path(dest: Path) -> Path:
    """Where the bytes of an unfinished download of `dest` accumulate."""
    return dest.with_name(dest.name + ".part")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    expected_size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    chunk_bytes: int = CHUNK_BYTES,
) -> DownloadResult:
    """Fetch `url` into `dest`, resuming a previous `.part` and verifying `sha256`.

    `sha256` is keyword-only and has no default on purpose: every caller states whether it has a
    published checksum. With `sha256=None` the digest is computed and returned unverified
    (`verified=False`) for the caller to pin; an existing `dest` is then downloaded again, since
    nothing says it is right. With a checksum, an existing matching `dest` returns at once.

    `timeout` bounds each connect and each read (seconds), not the whole transfer. `retries` is how
    many further attempts follow a transient failure (0 = one attempt); the `.part` file is kept
    when they are exhausted, so re-running continues where it stopped. `backoff` is the first wait
    in seconds, doubled per attempt (with jitter, so a fleet of workers does not retry in step).
    """
    dest = Path(dest)
    want = normalise_sha256(sha256) if sha256 is not None else None
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ModelFileError(
            f"cannot download {url!r}: only http(s) URLs are supported; for a local file use "
            "`pulse models import PATH`"
        )
    if want is not None and dest.is_file() and sha256_file(dest) == want:
        return DownloadResult(dest, want, dest.stat().st_size, True, False, 0)

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    attempts = 0
    restarted_after_mismatch = False
    while True:
        attempts += 1
        try:
            resumed = _fetch_once(
                url, part, want, expected_size, progress, timeout, chunk_bytes=chunk_bytes
            )
        except _TransientError as exc:
            if attempts > retries:
                kept = f"; {part} is kept and the next run resumes it" if part.exists() else ""
                raise ModelFileError(
                    f"download of {url} failed after {attempts} attempt(s): {exc}{kept}"
                ) from exc
            delay = max(exc.retry_after or 0.0, backoff * 2 ** (attempts - 1))
            time.sleep(min(MAX_BACKOFF_S, delay) * random.uniform(0.5, 1.0))
            continue

        actual = sha256_file(part, chunk_bytes=chunk_bytes)
        size = part.stat().st_size
        if want is not None and actual != want:
            _discard(part)
            if resumed and not restarted_after_mismatch:
                # The kept bytes may come from another version of the file (or a bad disk): one
                # clean download from byte 0 decides whether the source itself is wrong.
                restarted_after_mismatch = True
                continue
            raise ModelFileError(
                f"checksum mismatch for {url}: expected sha256 {want}, got {actual} "
                f"({size} bytes); the file was deleted and {dest} was not written. The source may "
                "have changed or be corrupt: check the URL and the published checksum."
            )
        if expected_size is not None and size != expected_size:
            _discard(part)
            raise ModelFileError(
                f"{url} gave {size} bytes, expected {expected_size}; the file was deleted and "
                f"{dest} was not written"
            )
        replace_file(part, dest)  # `.part` is fsynced already (`_flush`); this makes it durable
        _meta_path(part).unlink(missing_ok=True)
        return DownloadResult(dest, actual, size, want is not None, resumed, attempts)


# --------------------------------------------------------------------------------------------------
# One attempt


class _TransientError(Exception):
    """A failure worth retrying: the `.part` file stays for the next attempt to resume."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds the server asked us to wait, when it said so


def _fetch_once(
    url: str,
    part: Path,
    want: str | None,
    expected_size: int | None,
    progress: Progress | None,
    timeout: float,
    *,
    chunk_bytes: int,
) -> bool:
    """Bring `part` to the full length of the resource; return whether earlier bytes were kept."""
    offset = part.stat().st_size if part.is_file() else 0
    meta = _read_meta(part)
    validator = _validator(meta)
    if offset and (meta.get("url", url) != url or (want is None and validator is None)):
        # Without a checksum, spliced bytes from another version could never be detected and the
        # wrong digest would be pinned forever; without a validator (ETag / Last-Modified) the
        # server cannot tell us the file is unchanged, so start again.
        offset = _discard(part)
    if offset and expected_size is not None and offset > expected_size:
        offset = _discard(part)

    headers = {
        "User-Agent": f"pulse-pipeline/{_version()} (+urllib)",
        "Accept-Encoding": "identity",  # a compressed body would break byte offsets
    }
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator is not None:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and offset:
                total = _content_range_total(exc.headers.get("Content-Range"))
                if total == offset:
                    return True  # the previous attempt had everything; only the landing was missing
                _discard(part)
                raise _TransientError(
                    f"{url} refused to resume at byte {offset}; restarting"
                ) from exc
            raise _http_error(url, exc) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _connection_error(url, exc) from exc

    with response:
        status = response.status
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                _discard(part)
                raise _TransientError(f"{url} answered byte {start} for a resume at {offset}")
            mode = "ab"
        elif status == 200:
            # A plain 200 to a Range request: the server ignores ranges, or If-Range told it the
            # file changed. Either way the body is the whole file from byte 0.
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
            _write_meta(part, url, response.headers, total)
        else:
            raise ModelFileError(f"{url}: unexpected HTTP {status} {response.reason}")
        if expected_size is not None and total is not None and total != expected_size:
            _discard(part)
            raise ModelFileError(
                f"{url} is {total} bytes, expected {expected_size}: the file at "
                "that address is not the one described; nothing was written"
            )

        done = offset
        if progress is not None:
            progress(done, total)
        try:
            out = part.open(mode)
        except OSError as exc:
            raise ModelFileError(f"cannot write {part}: {exc}") from exc
        with out:
            while True:
                try:
                    chunk = response.read(chunk_bytes)
                except (OSError, http.client.HTTPException) as exc:
                    _flush(out)
                    raise _TransientError(
                        f"connection lost after {done} of {total or '?'} bytes ({exc!r})"
                    ) from exc
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:  # disk full, quota: retrying cannot help
                    raise ModelFileError(f"cannot write {part}: {exc}") from exc
                done += len(chunk)
                if total is not None and done > total:
                    out.close()
                    _discard(part)
                    raise _TransientError(f"{url} sent more than the announced {total} bytes")
                if progress is not None:
                    progress(done, total)
            _flush(out)
    if total is not None and done < total:
        raise _TransientError(f"connection closed after {done} of {total} bytes")
    return offset > 0


def _http_error(url: str, exc: urllib.error.HTTPError) -> Exception:
    """Map an HTTP error status to a retryable error or a final, actionable ModelFileError."""
    code = exc.code
    if code in _TRANSIENT_HTTP or code >= 500:
        return _TransientError(f"HTTP {code} {exc.reason}", _retry_after(exc.headers))
    if code in (404, 410):
        return ModelFileError(
            f"{url} was not found (HTTP {code}): the file may have moved. Check the catalogue "
            "entry's URL, or download the file by hand and run `pulse models import PATH`."
        )
    if code in (401, 403):
        return ModelFileError(
            f"{url} refused access (HTTP {code}): the host wants a login or blocks scripted "
            "downloads. Download the file in a browser and run `pulse models import PATH`."
        )
    return ModelFileError(f"{url}: HTTP {code} {exc.reason}")


def _connection_error(url: str, exc: BaseException) -> Exception:
    """Describe a failure to talk to the server in terms of what the user can check."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    host = urllib.parse.urlsplit(url).netloc
    if isinstance(reason, ConnectionRefusedError):
        return _TransientError(
            f"connection refused by {host}: nothing listens there (server down, wrong port, "
            "or this machine needs a proxy: set HTTPS_PROXY)"
        )
    if isinstance(reason, socket.gaierror):
        message = (
            f"cannot resolve host {host!r} ({reason.strerror}): no network or DNS on this machine?"
        )
        if reason.errno == getattr(socket, "EAI_AGAIN", None):
            return _TransientError(message)
        return ModelFileError(f"cannot download {url}: {message}")
    if isinstance(reason, ssl.SSLCertVerificationError):
        return ModelFileError(
            f"cannot download {url}: TLS certificate not trusted ({reason.verify_message}); "
            "behind an intercepting proxy, set SSL_CERT_FILE to its CA bundle"
        )
    if isinstance(reason, TimeoutError):
        return _TransientError(f"{host} did not answer in time")
    if isinstance(reason, OSError) and reason.errno == errno.ENETUNREACH:
        return _TransientError(f"network unreachable while contacting {host}")
    return _TransientError(f"cannot reach {host}: {reason!r}")


# --------------------------------------------------------------------------------------------------
# Headers


def _content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total or None) from `bytes first-last/total`; a 206 without it is unusable."""
    match = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if match is None:
        raise _TransientError(f"206 response with an unreadable Content-Range: {value!r}")
    total = match.group(3)
    return int(match.group(1)), (int(total) if total != "*" else None)


def _content_range_total(value: str | None) -> int | None:
    """The total of a 416's `bytes */total`, when the server sent it."""
    match = re.match(r"\s*bytes\s+\*/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def _retry_after(headers: Message) -> float | None:
    value = headers.get("Retry-After")
    return float(value) if value and value.strip().isdigit() else None


# --------------------------------------------------------------------------------------------------
# The `.part.json` sidecar: which URL and which version of it the `.part` bytes came from


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict[str, object]:
    try:
        data = json.loads(_meta_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_meta(part: Path, url: str, headers: Message, total: int | None) -> None:
    meta = {
        "url": url,
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
        "total": total,
    }
    with contextlib.suppress(OSError):  # only costs a restart instead of a resume
        _meta_path(part).write_text(json.dumps(meta), encoding="utf-8")


def _validator(meta: dict[str, object]) -> str | None:
    """A strong ETag, else Last-Modified: what If-Range accepts to prove the bytes still match."""
    etag = meta.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    modified = meta.get("last_modified")
    return modified if isinstance(modified, str) and modified else None


# --------------------------------------------------------------------------------------------------
# Files


def _discard(part: Path) -> int:
    """Forget a partial download (bytes and sidecar); returns the new offset, 0."""
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)
    return 0


def _flush(out: IO[bytes]) -> None:
    """Make written bytes durable before they are resumed from or renamed into place."""
    out.flush()
    os.fsync(out.fileno())


def _version() -> str:
    try:
        return metadata.version("pulse-pipeline")
    except metadata.PackageNotFoundError:
        return "dev"
