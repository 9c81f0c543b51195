"""Local folders and S3 (or any S3-compatible store) behind one small interface.

Flows move images between a `source` and a `dest` that are either a local folder or
`s3://bucket/prefix`; everything above this module speaks only `Storage`, so tests run on
folders and production on buckets without a second code path.

Design choices, and why:
- Keys are relative POSIX paths checked by `validate_key`: a key read from an untrusted listing or
  a manifest can never name a file outside the root (`..`, absolute paths, backslashes, empty or
  `.` segments and NUL are refused), and the same key means the same object locally and on S3.
- Writes are atomic: a reader (or a re-run deciding what to skip) never sees half an object.
  Locally `pulse_core.atomic` writes a temp file in the same folder (named with
  `LOCAL_TMP_PREFIX`, which listings skip), fsyncs it, `os.replace`s the final name and fsyncs
  the folder; on S3 a PUT (or a completed multipart upload) is atomic per object.
- `check()` runs before any work, so a typo in a bucket name or a wrong secret fails the flow in
  the first second with a message saying what to fix, not after an hour of GPU time.
- Errors are `StorageError`; those worth retrying (throttling, 5xx, timeouts, dropped
  connections) are `TransientStorageError`, so Prefect tasks can retry exactly those
  (`retry_condition_fn=lambda *_, exc=None: is_transient(exc)` style).
- Every S3 request (except `check()`) retries transient failures for up to a time budget,
  `StorageConfig.retry_budget_s` (default 300 s, or `PULSE_STORAGE_RETRY_BUDGET_S` in the
  environment of the process making the request), with capped exponential backoff and jitter,
  on top of botocore's own few quick retries. Measured before the budget existed: a 15 s outage
  of the store was survived, a 75 s one failed the run after ~48 s of retries; an outage is a
  matter of minutes (a restarted gateway, a failover), so the budget is counted in minutes.
  Spent, it raises `RetryBudgetExhaustedError` (a `TransientStorageError`) saying what failed,
  for how long it was retried and which setting raises the budget. Permanent errors (access
  denied, no such bucket, 4xx) are never retried. `check()` is exempt on purpose: at the start
  of a run an unreachable endpoint is far more often a typo than an outage, and nothing is lost
  by failing then.
- Local roots never reach outside themselves: reads, writes and deletes resolve symbolic links
  and refuse a path that lands outside the (resolved) root, and only regular files are read
  (a FIFO would block, a device may have side effects on open). Listings still show such entries,
  so that the pipeline records them as failed inputs with the reason instead of silently
  dropping them.
- Secrets never reach a message or a repr: `StorageConfig.__repr__` masks them and every message
  built here is scrubbed of the configured secret values.
- Storage objects pickle (the boto3 client is rebuilt lazily), because Dask ships task
  arguments to workers by pickling them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import mimetypes
import os
import random
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from pulse_core.atomic import LOCAL_TMP_PREFIX, atomic_write_bytes
from pulse_core.errors import ConfigError, StorageError

MiB = 1024 * 1024
S3_MIN_PART_SIZE = 5 * MiB  # S3 refuses multipart parts smaller than this (except the last)
S3_MAX_KEY_BYTES = 1024  # S3's limit on a full key, UTF-8 encoded

# The retry budget (see the module docstring). Sleeps double from the first one up to the cap;
# each is drawn in [half, all] of its nominal value, so that workers that lost the store at the
# same moment do not come back at the same moment. The cap bounds how long after the end of an
# outage a waiting request notices it (at most ~10 s, plus its own timeouts).
DEFAULT_RETRY_BUDGET_S = 300.0  # seconds one request keeps retrying transient failures
RETRY_BUDGET_ENV = "PULSE_STORAGE_RETRY_BUDGET_S"  # overrides the default, per process
RETRY_FIRST_SLEEP_S = 0.5  # nominal sleep before the first retry
RETRY_MAX_SLEEP_S = 10.0  # cap of one sleep

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# ---------------------------------------------------------------------------------------------


class TransientStorageError(StorageError):
    """A storage failure that may succeed if retried (throttling, 5xx, timeout, lost connection).

    Kept apart from `StorageError` so that retries never hammer a store that said "no such bucket"
    or "access denied": those will not fix themselves.
    """

    transient = True


class RetryBudgetExhaustedError(TransientStorageError):
    """A transient failure that outlasted the retry budget: the store was down too long.

    Still transient (a later run may well succeed), but the waiting has been done: Prefect tasks
    do not retry it again (`tasks.restore.retry_transient_only`), so a run fails after about one
    budget instead of several. The message says which setting raises the budget.
    """

    def __init__(self, message: str, retried_s: float = 0.0, attempts: int = 0) -> None:
        super().__init__(message)
        self.retried_s = retried_s  # seconds from the first attempt to giving up
        self.attempts = attempts  # requests made, the first included

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); keep the extra fields (Dask and Prefect pickle these).
        return (type(self), (str(self), self.retried_s, self.attempts))


class StorageNotFoundError(StorageError):
    """The key (object or file) does not exist. Callers deciding "skip or redo" catch this."""


def is_transient(exc: BaseException | None) -> bool:
    """True when `exc` is a storage failure worth retrying (for Prefect's retry_condition_fn)."""
    return isinstance(exc, TransientStorageError)


# ---------------------------------------------------------------------------------------------


@dataclass
class StorageConfig:
    """How to reach S3. Ignored for local folders. Every field has a working default.

    Credentials left as None come from the standard AWS chain (env vars, ~/.aws, instance role),
    which is what production wants; explicit values are for tests and multi-account setups.
    """

    endpoint_url: str | None = None  # None = AWS chain (AWS_ENDPOINT_URL[_S3] env, config, AWS)
    region: str | None = None  # None = AWS chain (AWS_REGION / AWS_DEFAULT_REGION, config)
    access_key: str | None = None  # None = AWS credential chain
    secret_key: str | None = None  # None = AWS credential chain; never printed
    session_token: str | None = None  # temporary credentials only; never printed
    connect_timeout_s: float = 10.0  # seconds to open a connection
    read_timeout_s: float = 60.0  # seconds without a byte before a read is abandoned
    max_attempts: int = 5  # total tries per request, botocore "standard" retry mode
    retry_budget_s: float | None = None  # seconds a request retries transient failures in all;
    # None = PULSE_STORAGE_RETRY_BUDGET_S of the process making it, else 300; 0 = no more retries
    multipart_threshold: int = 64 * MiB  # objects at least this large use multipart upload
    multipart_chunksize: int = 16 * MiB  # part size; >= 5 MiB (S3's minimum)
    max_concurrency: int = 4  # parallel part uploads of one multipart object
    addressing_style: str | None = None  # "path" | "virtual" | "auto"; None = path with endpoint
    list_page_size: int = 1000  # keys per ListObjectsV2 request (1000 = S3's maximum)

    def __post_init__(self) -> None:
        if (self.access_key is None) != (self.secret_key is None):
            raise ConfigError(
                "StorageConfig needs both access_key and secret_key, or neither "
                "(then the AWS credential chain is used)"
            )
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ConfigError("StorageConfig timeouts must be positive seconds")
        if self.max_attempts < 1:
            raise ConfigError("StorageConfig.max_attempts must be >= 1 (1 = no retries)")
        if self.retry_budget_s is not None:
            _check_budget(self.retry_budget_s, "StorageConfig.retry_budget_s")
        if self.multipart_threshold < 1:
            raise ConfigError("StorageConfig.multipart_threshold must be >= 1 byte")
        if self.multipart_chunksize < S3_MIN_PART_SIZE:
            raise ConfigError(
                f"StorageConfig.multipart_chunksize must be >= {S3_MIN_PART_SIZE} bytes (5 MiB): "
                "S3 rejects smaller parts"
            )
        if self.max_concurrency < 1:
            raise ConfigError("StorageConfig.max_concurrency must be >= 1")
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise ConfigError(
                f"StorageConfig.addressing_style must be 'path', 'virtual', 'auto' or None, "
                f"not {self.addressing_style!r}"
            )
        if not 1 <= self.list_page_size <= 1000:
            raise ConfigError("StorageConfig.list_page_size must be between 1 and 1000")

    def __repr__(self) -> str:
        def mask(value: str | None) -> str:
            return "None" if value is None else "'***'"

        fields = [
            f"endpoint_url={self.endpoint_url!r}",
            f"region={self.region!r}",
            f"access_key={mask(self.access_key)}",
            f"secret_key={mask(self.secret_key)}",
            f"session_token={mask(self.session_token)}",
            f"connect_timeout_s={self.connect_timeout_s!r}",
            f"read_timeout_s={self.read_timeout_s!r}",
            f"max_attempts={self.max_attempts!r}",
            f"retry_budget_s={self.retry_budget_s!r}",
            f"multipart_threshold={self.multipart_threshold!r}",
            f"multipart_chunksize={self.multipart_chunksize!r}",
            f"max_concurrency={self.max_concurrency!r}",
            f"addressing_style={self.addressing_style!r}",
            f"list_page_size={self.list_page_size!r}",
        ]
        return f"StorageConfig({', '.join(fields)})"

    __str__ = __repr__

    def secrets(self) -> tuple[str, ...]:
        """Values that must be scrubbed from any message (non-empty ones only)."""
        return tuple(s for s in (self.secret_key, self.session_token) if s)

    def effective_retry_budget_s(self) -> float:
        """The retry budget in force here: the field, else the environment, else the default.

        Read when a request is made, not when the config is built: configs are built in the flow
        process and pickled to Dask workers, and each process is configured by its own
        environment, like the AWS_* variables boto3 reads.
        """
        if self.retry_budget_s is not None:
            return float(self.retry_budget_s)
        raw = os.environ.get(RETRY_BUDGET_ENV, "").strip()
        if not raw:
            return DEFAULT_RETRY_BUDGET_S
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(
                f"{RETRY_BUDGET_ENV}={raw!r} is not a number of seconds (e.g. 300)"
            ) from None
        return _check_budget(value, RETRY_BUDGET_ENV)


def _check_budget(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number of seconds, not {value!r}")
    if value < 0:
        raise ConfigError(f"{name} must be >= 0 seconds (0 = no retries beyond botocore's)")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Retrying within a budget


def backoff_s(retry: int, jitter: float) -> float:
    """Seconds to sleep before retry number `retry` (1 = the first retry).

    Nominal sleeps double from RETRY_FIRST_SLEEP_S up to RETRY_MAX_SLEEP_S (0.5, 1, 2, 4, 8,
    10, 10, ...); `jitter` in [0, 1) picks a point in [half, all] of that ("equal jitter"), so
    the sleeps still grow while workers that failed together spread out.
    """
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, got {retry}")
    nominal = min(RETRY_MAX_SLEEP_S, RETRY_FIRST_SLEEP_S * 2.0 ** min(retry - 1, 32))
    return nominal * (0.5 + 0.5 * min(max(jitter, 0.0), 1.0))


def retry_transient(
    call: Callable[[], _T],
    *,
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> _T:
    """`call()`, retried on `TransientStorageError` until it succeeds or `budget_s` is spent.

    Any other exception propagates at once (a permanent error does not get better by waiting).
    The budget bounds when the last attempt may start; the last sleep is shortened to end at
    the budget, so the store gets one more chance right at the end. When it is spent, the last
    error is raised again as `RetryBudgetExhaustedError`, with how long it was retried and the
    setting that raises the budget. `clock`, `sleep` and `jitter` are injectable for tests.
    """
    start = clock()
    retry = 0
    while True:
        try:
            return call()
        except TransientStorageError as exc:
            elapsed = clock() - start
            remaining = budget_s - elapsed
            if remaining <= 0 or isinstance(exc, RetryBudgetExhaustedError):
                raise _budget_spent(exc, elapsed, retry + 1, budget_s) from None
            retry += 1
            delay = min(backoff_s(retry, jitter()), remaining)
            _log.warning(
                "%s; retry %d in %.1f s (%.0f s of the %.0f s storage retry budget used)",
                exc,
                retry,
                delay,
                elapsed,
                budget_s,
            )
            sleep(delay)


def _budget_spent(
    exc: TransientStorageError, elapsed: float, attempts: int, budget_s: float
) -> RetryBudgetExhaustedError:
    if isinstance(exc, RetryBudgetExhaustedError):
        return exc
    return RetryBudgetExhaustedError(
        f"{exc}; still failing after {elapsed:.0f} s of retries ({attempts} attempts; the "
        f"storage retry budget is {budget_s:g} s): if the store is down for longer than that, "
        f"raise {RETRY_BUDGET_ENV} (StorageConfig.retry_budget_s) for the flow and every "
        "worker, then run again (finished inputs are skipped)",
        retried_s=elapsed,
        attempts=attempts,
    )


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. `key` is relative to the storage root it was listed from."""

    key: str
    size: int  # bytes
    mtime: datetime | None = None  # last modification, UTC
    etag: str | None = None  # S3 ETag without quotes; None for local files


# ---------------------------------------------------------------------------------------------
# URLs and keys


def parse_url(url: str) -> tuple[str, str, str]:
    """Split a storage URL into (scheme, bucket, prefix).

    `s3://bucket/a/b/` -> ("s3", "bucket", "a/b"); `/data/in`, `data/in` and `file:///data/in`
    -> ("file", "", path) with the path as given (not resolved: `open_storage` does that).
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("a storage URL must be a non-empty string (a folder or s3://bucket/...)")
    if "\x00" in url:
        raise ConfigError("a storage URL must not contain NUL characters")
    if "://" not in url:
        return "file", "", url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"file URL {url!r} names host {parts.netloc!r}: only local files are supported "
                "(use file:///absolute/path)"
            )
        path = unquote(parts.path)
        if not path:
            raise ConfigError(f"file URL {url!r} has no path")
        return "file", "", path
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket or any(c.isspace() for c in bucket) or "@" in bucket:
            raise ConfigError(f"S3 URL {url!r} has no valid bucket: write s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise ConfigError(f"S3 URL {url!r} must not have a query or fragment")
        prefix = parts.path.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except StorageError as exc:
                raise ConfigError(f"S3 URL {url!r} has an invalid prefix: {exc}") from None
        return "s3", bucket, prefix
    raise ConfigError(
        f"unsupported storage URL scheme {parts.scheme!r} in {url!r}: "
        "use a local folder, file:///path or s3://bucket/prefix"
    )


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative POSIX key, else raise StorageError.

    Refusing rather than normalising is deliberate: `a/../b` or `a//b` would name different S3
    objects but the same local file, and a key that needs cleaning came from somewhere wrong.
    """
    if not isinstance(key, str):
        raise StorageError(f"a storage key must be a string, not {type(key).__name__}")
    if not key:
        raise StorageError("a storage key must not be empty")
    if "\x00" in key:
        raise StorageError(f"storage key {key!r} contains a NUL character")
    if "\\" in key:
        raise StorageError(f"storage key {key!r} contains a backslash: use '/' as separator")
    if key.startswith("/"):
        raise StorageError(f"storage key {key!r} is absolute: keys are relative to the root")
    for segment in key.split("/"):
        if segment == "":
            raise StorageError(f"storage key {key!r} has an empty segment ('//' or trailing '/')")
        if segment in (".", ".."):
            raise StorageError(
                f"storage key {key!r} has a {segment!r} segment: keys cannot leave their root"
            )
    if len(key.encode("utf-8")) > S3_MAX_KEY_BYTES:
        raise StorageError(f"storage key is longer than {S3_MAX_KEY_BYTES} bytes: {key[:80]!r}...")
    return key


def _validate_prefix(prefix: str) -> str:
    """A listing prefix: "" (everything), a key, or a key ending in "/" (one folder)."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def join_keys(*parts: str) -> str:
    """Join key fragments with "/" and validate the result (fragments may contain "/")."""
    cleaned = [p for p in parts if p != ""]
    if not cleaned:
        raise StorageError("join_keys needs at least one non-empty part")
    return validate_key("/".join(cleaned))


def _suffix_filter(suffixes: Iterable[str] | None) -> tuple[str, ...] | None:
    """Normalise suffixes to lower case: cameras and scanners write .JPG as often as .jpg."""
    if suffixes is None:
        return None
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    return tuple(s.lower() for s in suffixes)


def _matches(key: str, suffixes: tuple[str, ...] | None) -> bool:
    return suffixes is None or key.lower().endswith(suffixes)


def _guess_content_type(key: str) -> str | None:
    content_type, _ = mimetypes.guess_type(key, strict=False)
    if content_type is None and key.endswith(".parquet"):
        return "application/vnd.apache.parquet"
    return content_type


# ---------------------------------------------------------------------------------------------


class Storage(ABC):
    """A root (folder or bucket prefix) holding objects named by relative keys."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The root, as a URL a user can paste back (`s3://b/p`, or an absolute folder path)."""

    @abstractmethod
    def list(self, prefix: str = "", suffixes: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix`, in lexicographic key order, lazily.

        `prefix` is a plain string prefix, as in S3 ("a/b" matches "a/b.png" and "a/b/c.png");
        end it with "/" to list one folder. `suffixes` keeps keys ending in any of them
        (case-insensitive).
        """

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object. Missing key: StorageNotFoundError."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Create or replace the object atomically; content_type None = guessed from the key."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True when an object (not a folder) is stored under `key`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (idempotent re-runs)."""

    @abstractmethod
    def child(self, prefix: str) -> Storage:
        """A Storage rooted at `prefix` under this root (shares connection settings)."""

    @abstractmethod
    def check(self, create: bool = False) -> None:
        """Fail fast with a clear StorageError if the root cannot be reached.

        `create=True` (destinations) creates a missing local folder; buckets are never created
        here, since a missing production bucket is a configuration error, not something to paper
        over.
        """

    def join(self, *parts: str) -> str:
        """A validated key made of `parts` ("a", "b/c.png" -> "a/b/c.png")."""
        return join_keys(*parts)

    def local_path(self, key: str) -> Path:
        """The file backing `key`. Only local storage has one; tools needing a path ask here."""
        raise StorageError(f"{self.url} is not a local folder: no local path for {key!r}")

    def uri(self, key: str) -> str:
        """Where `key` lives, whole (`s3://bucket/prefix/key` or an absolute path): for reports."""
        return f"{self.url.rstrip('/')}/{validate_key(key)}"

    def share_url(self, key: str, expires_s: int) -> str | None:
        """An http(s) URL a browser can load for `expires_s` seconds, or None where there is none.

        S3 gives a presigned GET URL (signed locally, no request made); a local folder has no
        web address, so reports inline small previews instead.
        """
        return None

    def with_retry_budget(self, seconds: float) -> Storage:
        """This root with another retry budget; 0 = give up at the first transient failure.

        For best-effort requests after the store was found down (clean-up on the way out of a
        failed run): with the normal budget each of them would wait minutes for nothing. Local
        folders have no budget and return themselves.
        """
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def open_storage(url: str, config: StorageConfig | None = None) -> Storage:
    """The Storage for a folder path, `file:///path` or `s3://bucket/prefix`.

    Opening does no I/O (so it is cheap in a notebook and picklable for workers); call
    `check()` to find out whether the root can actually be reached.
    """
    scheme, bucket, prefix = parse_url(url)
    if scheme == "s3":
        return S3Storage(bucket, prefix, config or StorageConfig())
    return LocalStorage(prefix)


# ---------------------------------------------------------------------------------------------
# Local folders


def _os_error(exc: OSError, what: str) -> StorageError:
    """Map an OSError to a StorageError whose message says what to do."""
    if isinstance(exc, FileNotFoundError):
        return StorageNotFoundError(f"{what}: not found")
    if isinstance(exc, PermissionError):
        return StorageError(f"{what}: permission denied (check the folder's owner and mode)")
    if exc.errno == errno.ENOSPC:
        return StorageError(f"{what}: no space left on device")
    if exc.errno in (errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.EINTR, errno.ESTALE):
        return TransientStorageError(f"{what}: {exc.strerror or exc} (temporary, retry)")
    return StorageError(f"{what}: {exc.strerror or exc}")


def _not_a_file(path: Path) -> StorageError:
    """A folder is "not found" (as an S3 key with only children would be); others are refused."""
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if stat.S_ISDIR(mode):
        return StorageNotFoundError(f"cannot read {path}: it is a folder, not a file")
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    return StorageError(f"refusing to read {path}: it is {kind}; only regular files are read")


class LocalStorage(Storage):
    """A folder on a local (or mounted) file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))

    @property
    def url(self) -> str:
        return self.root.as_posix()

    def local_path(self, key: str) -> Path:
        # Lexical join of a validated key: it can only point inside the root.
        return self.root.joinpath(*validate_key(key).split("/"))

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self.local_path(prefix))

    def check(self, create: bool = False) -> None:
        if self.root.is_dir():
            if create and not os.access(self.root, os.W_OK | os.X_OK):
                raise StorageError(f"folder {self.url} is not writable (check owner and mode)")
            return
        if self.root.exists():
            raise StorageError(f"{self.url} exists but is not a folder")
        if not create:
            raise StorageNotFoundError(f"folder {self.url} does not exist")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, f"cannot create folder {self.url}") from exc

    def list(self, prefix: str = "", suffixes: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
        _validate_prefix(prefix)
        wanted = _suffix_filter(suffixes)
        # Start from the deepest folder the prefix names fully; filter the rest by startswith.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.local_path(folder) if folder else self.root
        if not start.is_dir() or (folder and not self._inside(start)):
            return  # a folder linked from elsewhere is not walked, as in `_walk`
        for key, path in self._walk(start, folder, prefix):
            if key.startswith(prefix) and _matches(key, wanted):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue  # deleted between listing and stat
                if stat.S_ISLNK(st.st_mode) and self._inside(path):
                    # A link within the root: show its target's size. A dangling one keeps
                    # the link's own (it is listed, and reading it says "not found").
                    with contextlib.suppress(OSError):
                        st = path.stat()
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk(self, folder: Path, rel: str, prefix: str) -> Iterator[tuple[str, Path]]:
        """Entries under `folder` that are not folders, in the order S3 would list their keys.

        Sorting by name + "/" for folders makes a depth-first walk come out in global
        lexicographic key order ("a-b" < "a/c" because "-" < "/"), like S3, without holding the
        whole tree in memory. Folders that cannot hold a key starting with `prefix` are skipped.
        Symbolic links to folders are neither walked (a link could lead anywhere, or in a loop)
        nor listed. Other links and special files (FIFOs, sockets, devices) are listed like
        files, so that the caller records the reason `read_bytes` refuses them with, rather
        than losing them quietly.
        """
        try:
            with os.scandir(folder) as it:
                entries = [
                    (e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in it
                ]
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _os_error(exc, f"cannot list {folder}") from exc
        for sort_name, entry in sorted(entries, key=lambda t: t[0]):
            key = f"{rel}/{entry.name}" if rel else entry.name
            if sort_name.endswith("/"):
                if f"{key}/".startswith(prefix) or prefix.startswith(f"{key}/"):
                    yield from self._walk(Path(entry.path), key, prefix)
            elif not entry.name.startswith(LOCAL_TMP_PREFIX) and not entry.is_dir():
                yield key, Path(entry.path)  # (is_dir() follows links: a linked folder is no file)

    def stale_temp_files(
        self, older_than: timedelta, now: datetime | None = None
    ) -> Iterator[ObjectInfo]:
        """Temp files of atomic writes (`LOCAL_TMP_PREFIX`) unmodified for `older_than`.

        `list` hides them (they are not objects), but a killed writer (kill -9 skips every
        `finally`) leaves them behind; this is how a cleanup finds them. A younger one may be a
        write in progress, so it is not returned. Walks the whole root (atomic writes happen in
        every output folder), never into linked folders. `now`: None = the current UTC time.
        """
        cutoff = (now or datetime.now(UTC)) - older_than
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(files):
                if not name.startswith(LOCAL_TMP_PREFIX):
                    continue
                path = Path(folder, name)
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue  # renamed into place or removed since the walk saw it
                mtime = datetime.fromtimestamp(st.st_mtime, UTC)
                if stat.S_ISREG(st.st_mode) and mtime <= cutoff:
                    yield ObjectInfo(path.relative_to(self.root).as_posix(), st.st_size, mtime)

    def _inside(self, path: Path) -> bool:
        """Whether `path`, with every symbolic link resolved, still lies inside the root."""
        return path.resolve().is_relative_to(self.root.resolve())

    def _contained(self, key: str, action: str, *, follow_last: bool) -> Path:
        """The path of `key`, or StorageError when a symbolic link takes it outside the root.

        `validate_key` makes the lexical path safe; links are what can still lead out (a source
        holding `photo.png -> /home/user/.ssh/id_rsa`, or a folder linked elsewhere). Reads
        follow the last component (`follow_last`); writes and deletes replace or remove the
        last component itself, never its target, so only its folder must stay inside. Checked
        just before the operation: a link swapped in between is a race this does not close
        (that needs openat2's RESOLVE_BENEATH); archives, not live attackers, are the threat.
        """
        path = self.local_path(key)
        if not self._inside(path if follow_last else path.parent):
            raise StorageError(
                f"refusing to {action} {key!r} in {self.url}: a symbolic link takes it outside "
                f"that folder (to {path.resolve()}); only files inside the folder are used"
            )
        return path

    def read_bytes(self, key: str) -> bytes:
        path = self._contained(key, "read", follow_last=True)
        try:
            # Only regular files: opening a FIFO blocks until a writer comes, a device may act
            # on open. Checked before opening, and again on the opened file: the resolved path
            # is opened without following links and without blocking, so a FIFO or link swapped
            # in between can neither block the read nor lead elsewhere.
            real = path.resolve()
            if not stat.S_ISREG(real.stat().st_mode):
                raise _not_a_file(path)
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise _not_a_file(path)
                return f.read()
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the file became a link after the check
                raise StorageError(f"cannot read {path}: it changed into a symbolic link") from None
            raise _os_error(exc, f"cannot read {path}") from exc

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        # content_type has no meaning on a file system; accepted for interface symmetry.
        path = self._contained(key, "write", follow_last=False)
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise _os_error(exc, f"cannot write {path}") from exc

    def exists(self, key: str) -> bool:
        path = self.local_path(key)
        return self._inside(path) and path.is_file()

    def delete(self, key: str) -> None:
        path = self._contained(key, "delete", follow_last=False)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            raise StorageError(f"cannot delete {path}: it is a folder, not a file") from None
        except OSError as exc:
            raise _os_error(exc, f"cannot delete {path}") from exc


# ---------------------------------------------------------------------------------------------
# S3 and S3-compatible stores

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
        "OperationAborted",
    }
)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "InvalidSecurity",
        "403",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or StorageConfig.access_key / "
    "secret_key, or the AWS profile in use) and the bucket's policy"
)


MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's limit for a presigned URL


class S3Storage(Storage):
    """A prefix in an S3 bucket, through boto3 with explicit timeouts and retries."""

    def __init__(self, bucket: str, prefix: str = "", config: StorageConfig | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.config = config or StorageConfig()
        self._client: Any = None
        self._lock = threading.Lock()

    # -- pickling: Dask sends storages to workers; boto3 clients do not pickle.
    def __getstate__(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.bucket = state["bucket"]
        self.prefix = state["prefix"]
        self.config = state["config"]
        self._client = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use; thread-safe, shared with children)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        cfg = self.config
        style = cfg.addressing_style
        if style is None:
            # S3-compatible stores on a host:port (SeaweedFS, MinIO) only understand path style.
            custom = (
                cfg.endpoint_url
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
            )
            style = "path" if custom else "auto"
        session = boto3.session.Session(
            aws_access_key_id=cfg.access_key,
            aws_secret_access_key=cfg.secret_key,
            aws_session_token=cfg.session_token,
            region_name=cfg.region,
        )
        return session.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            config=Config(
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=cfg.read_timeout_s,
                # total_max_attempts counts the first try; botocore's "max_attempts" does not
                retries={"total_max_attempts": cfg.max_attempts, "mode": "standard"},
                s3={"addressing_style": style},
                user_agent_extra="pulse-pipeline",
            ),
        )

    @property
    def endpoint(self) -> str:
        """The endpoint actually used (after the AWS chain), for messages."""
        try:
            return str(self.client.meta.endpoint_url)
        except Exception:  # credentials/config errors surface later with their own message
            return self.config.endpoint_url or "(AWS default)"

    def _full_key(self, key: str) -> str:
        key = validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str | None = None) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}" if key is not None else self.url

    def share_url(self, key: str, expires_s: int) -> str | None:
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise StorageError(f"a presigned URL lasts 1 s to 7 days, not {expires_s} s")
        params = {"Bucket": self.bucket, "Key": self._full_key(key)}
        try:
            url = self.client.generate_presigned_url("get_object", params, ExpiresIn=expires_s)
        except Exception as exc:  # no credentials: the report goes without links, not the run
            raise self._error(exc, "presign", key) from exc
        return str(url)

    def child(self, prefix: str) -> S3Storage:
        child = S3Storage(self.bucket, self._full_key(prefix), self.config)
        child._client = self._client  # share the connection pool when it already exists
        return child

    def with_retry_budget(self, seconds: float) -> S3Storage:
        config = replace(self.config, retry_budget_s=_check_budget(seconds, "retry budget"))
        other = S3Storage(self.bucket, self.prefix, config)
        other._client = self._client  # the budget is ours, not botocore's: same client
        return other

    # -- error mapping

    def _scrub(self, text: str) -> str:
        for secret in self.config.secrets():
            text = text.replace(secret, "***")
        return text

    def _error(self, exc: BaseException, action: str, key: str | None = None) -> StorageError:
        """A StorageError for `exc` raised while doing `action` on `key` (or the root)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = self._where(key)
        endpoint = self.endpoint
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = self._scrub(str(err.get("Message") or code or status))
            if code == "NoSuchBucket" or (key is None and (status == 404 or code in ("404",))):
                return StorageError(
                    f"bucket {self.bucket!r} does not exist at endpoint {endpoint}: "
                    "create it or fix the URL"
                )
            if code in _ACCESS_CODES or status == 403:
                return StorageError(
                    f"access denied while trying to {action} {where} at endpoint {endpoint} "
                    f"({code or status}): {_CREDENTIALS_HINT}"
                )
            if code in _NOT_FOUND_CODES or status == 404:
                return StorageNotFoundError(f"{where} not found")
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TransientStorageError(
                    f"cannot {action} {where}: {code or status} {detail} "
                    f"(temporary, after {self.config.max_attempts} attempts)"
                )
            return StorageError(f"cannot {action} {where}: {code or status} {detail}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"no usable AWS credentials to {action} {where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or StorageConfig.access_key / secret_key, or a profile)"
            )
        if isinstance(exc, ConnectionError | HTTPClientError) or type(exc).__name__ in (
            "ResponseStreamingError",
            "IncompleteReadError",
        ):
            return TransientStorageError(
                f"cannot {action} {where}: cannot reach endpoint {endpoint} "
                f"({type(exc).__name__}); check the endpoint URL and network (temporary, retry)"
            )
        if isinstance(exc, BotoCoreError):
            return StorageError(f"cannot {action} {where}: {self._scrub(str(exc))}")
        cause = exc.__cause__ or exc.__context__
        if cause is not None and cause is not exc:
            return self._error(cause, action, key)
        return StorageError(f"cannot {action} {where}: {self._scrub(str(exc))}")

    # -- requests: every one goes through `_request` (error mapping + the retry budget)

    def _attempt(self, action: str, key: str | None, call: Callable[[], _T]) -> _T:
        """One try of `call` (with botocore's own retries), its failure as a StorageError."""
        try:
            return call()
        except StorageError:
            raise
        except Exception as exc:
            raise self._error(exc, action, key) from None

    def _request(self, action: str, key: str | None, call: Callable[[], _T]) -> _T:
        """`call`, retried on transient failures within the configured retry budget.

        Every call passed here must be safe to repeat: reads, listings of one page, and writes
        and deletes of a whole object under a fixed key all are.
        """
        return retry_transient(
            lambda: self._attempt(action, key, call),
            budget_s=self.config.effective_retry_budget_s(),
        )

    # -- operations

    def check(self, create: bool = False) -> None:
        # No retry budget here: see the module docstring (fail fast, before any work).
        self._attempt("reach", None, lambda: self.client.head_bucket(Bucket=self.bucket))

    def list(self, prefix: str = "", suffixes: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
        _validate_prefix(prefix)
        wanted = _suffix_filter(suffixes)
        root = f"{self.prefix}/" if self.prefix else ""
        # Page by page (not boto3's paginator), so that a page that fails is retried on its own
        # and the keys already yielded are not yielded again.
        request: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": root + prefix,
            "MaxKeys": self.config.list_page_size,
        }
        while True:
            page = self._request(
                "list", None, lambda args=dict(request): self.client.list_objects_v2(**args)
            )
            for obj in page.get("Contents", ()):
                key = obj["Key"][len(root) :]
                if not key or key.endswith("/") or not _matches(key, wanted):
                    continue  # "folder" marker objects are not objects to process
                etag = obj.get("ETag")
                yield ObjectInfo(
                    key,
                    int(obj.get("Size", 0)),
                    obj.get("LastModified"),
                    etag.strip('"') if etag else None,
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            request["ContinuationToken"] = token

    def read_bytes(self, key: str) -> bytes:
        full = self._full_key(key)

        def get() -> bytes:  # the body is read inside the retry: a dropped stream is retried
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            return bytes(response["Body"].read())

        return self._request("read", key, get)

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        full = self._full_key(key)
        content_type = content_type or _guess_content_type(key)
        extra = {"ContentType": content_type} if content_type else {}

        def put() -> None:
            if len(data) < self.config.multipart_threshold:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, **extra)
                return
            from boto3.s3.transfer import TransferConfig

            self.client.upload_fileobj(
                io.BytesIO(data),  # a fresh stream per attempt
                self.bucket,
                full,
                ExtraArgs=extra or None,
                Config=TransferConfig(
                    multipart_threshold=self.config.multipart_threshold,
                    multipart_chunksize=self.config.multipart_chunksize,
                    max_concurrency=self.config.max_concurrency,
                ),
            )

        self._request("write", key, put)

    def exists(self, key: str) -> bool:
        full = self._full_key(key)
        try:
            self._request(
                "look up", key, lambda: self.client.head_object(Bucket=self.bucket, Key=full)
            )
        except StorageNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        full = self._full_key(key)
        try:
            self._request(
                "delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full)
            )
        except StorageNotFoundError:
            return
