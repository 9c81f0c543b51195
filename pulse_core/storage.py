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
- Secrets never reach a message or a repr: `StorageConfig.__repr__` masks them and every message
  built here is scrubbed of the configured secret values.
- Storage objects pickle (the boto3 client is rebuilt lazily), because Dask ships task
  arguments to workers by pickling them.
"""

from __future__ import annotations

import errno
import io
import mimetypes
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pulse_core.atomic import LOCAL_TMP_PREFIX, atomic_write_bytes
from pulse_core.errors import ConfigError, StorageError

MiB = 1024 * 1024
S3_MIN_PART_SIZE = 5 * MiB  # S3 refuses multipart parts smaller than this (except the last)
S3_MAX_KEY_BYTES = 1024  # S3's limit on a full key, UTF-8 encoded

# ---------------------------------------------------------------------------------------------


class TransientStorageError(StorageError):
    """A storage failure that may succeed if retried (throttling, 5xx, timeout, lost connection).

    Kept apart from `StorageError` so that retries never hammer a store that said "no such bucket"
    or "access denied": those will not fix themselves.
    """

    transient = True


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
        if not start.is_dir():
            return
        for key, path in self._walk(start, folder, prefix):
            if key.startswith(prefix) and _matches(key, wanted):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # deleted between listing and stat
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk(self, folder: Path, rel: str, prefix: str) -> Iterator[tuple[str, Path]]:
        """Files under `folder` in the order S3 would list their keys.

        Sorting by name + "/" for folders makes a depth-first walk come out in global
        lexicographic key order ("a-b" < "a/c" because "-" < "/"), like S3, without holding the
        whole tree in memory. Folders that cannot hold a key starting with `prefix` are skipped.
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
            elif not entry.name.startswith(LOCAL_TMP_PREFIX) and entry.is_file():
                yield key, Path(entry.path)

    def read_bytes(self, key: str) -> bytes:
        path = self.local_path(key)
        try:
            return path.read_bytes()
        except IsADirectoryError:
            raise StorageNotFoundError(f"cannot read {path}: it is a folder, not a file") from None
        except OSError as exc:
            raise _os_error(exc, f"cannot read {path}") from exc

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        # content_type has no meaning on a file system; accepted for interface symmetry.
        path = self.local_path(key)
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise _os_error(exc, f"cannot write {path}") from exc

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.local_path(key)
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
                retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
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

    def child(self, prefix: str) -> S3Storage:
        child = S3Storage(self.bucket, self._full_key(prefix), self.config)
        child._client = self._client  # share the connection pool when it already exists
        return child

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

    # -- operations

    def check(self, create: bool = False) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._error(exc, "reach") from None

    def list(self, prefix: str = "", suffixes: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
        _validate_prefix(prefix)
        wanted = _suffix_filter(suffixes)
        root = f"{self.prefix}/" if self.prefix else ""
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=root + prefix,
                PaginationConfig={"PageSize": self.config.list_page_size},
            )
            for page in pages:
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
        except StorageError:
            raise
        except Exception as exc:
            raise self._error(exc, "list", None) from None

    def read_bytes(self, key: str) -> bytes:
        full = self._full_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            return bytes(response["Body"].read())
        except Exception as exc:
            raise self._error(exc, "read", key) from None

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        full = self._full_key(key)
        content_type = content_type or _guess_content_type(key)
        extra = {"ContentType": content_type} if content_type else {}
        try:
            if len(data) < self.config.multipart_threshold:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, **extra)
            else:
                from boto3.s3.transfer import TransferConfig

                self.client.upload_fileobj(
                    io.BytesIO(data),
                    self.bucket,
                    full,
                    ExtraArgs=extra or None,
                    Config=TransferConfig(
                        multipart_threshold=self.config.multipart_threshold,
                        multipart_chunksize=self.config.multipart_chunksize,
                        max_concurrency=self.config.max_concurrency,
                    ),
                )
        except Exception as exc:
            raise self._error(exc, "write", key) from None

    def exists(self, key: str) -> bool:
        full = self._full_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except Exception as exc:
            error = self._error(exc, "look up", key)
            if isinstance(error, StorageNotFoundError):
                return False
            raise error from None

    def delete(self, key: str) -> None:
        full = self._full_key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            error = self._error(exc, "delete", key)
            if isinstance(error, StorageNotFoundError):
                return
            raise error from None
