"""Specification of pulse_core.storage: local folders directly, S3 against moto's server.

moto checks no signatures, so credential behaviour is specified in
test_storage_s3_integration.py against a real SeaweedFS server.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from pulse_core.errors import ConfigError, StorageError
from pulse_core.storage import (
    LOCAL_TMP_PREFIX,
    LocalStorage,
    MiB,
    S3Storage,
    StorageConfig,
    StorageNotFoundError,
    TransientStorageError,
    is_transient,
    join_keys,
    open_storage,
    parse_url,
    validate_key,
)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLE-SESSION-TOKEN"

UNSAFE_KEYS = [
    "",
    "../x.png",
    "a/../../x.png",
    "a/..",
    "/etc/passwd",
    "a\\b.png",
    "..\\x.png",
    "a//b.png",
    "a/",
    "a/./b.png",
    ".",
    "a\x00b.png",
]


# ---------------------------------------------------------------------------------------------
# Keys and URLs


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(StorageError):
        validate_key(key)


@pytest.mark.parametrize("key", ["a.png", "a/b/c.png", "x..y.png", ".hidden", "ü/é 1.png"])
def test_safe_keys_are_accepted(key: str) -> None:
    assert validate_key(key) == key


def test_overlong_keys_are_refused() -> None:
    with pytest.raises(StorageError, match="1024 bytes"):
        validate_key("a" * 1025)


def test_join_keys_validates_the_result() -> None:
    assert join_keys("a", "b/c.png") == "a/b/c.png"
    assert join_keys("", "a") == "a"
    with pytest.raises(StorageError):
        join_keys("a", "..", "b")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket", ("s3", "bucket", "")),
        ("s3://bucket/", ("s3", "bucket", "")),
        ("s3://bucket/a/b/", ("s3", "bucket", "a/b")),
        ("S3://bucket/a", ("s3", "bucket", "a")),
        ("/data/in", ("file", "", "/data/in")),
        ("data/in", ("file", "", "data/in")),
        ("file:///data/in", ("file", "", "/data/in")),
        ("file://localhost/data/in", ("file", "", "/data/in")),
        ("file:///data/with%20space", ("file", "", "/data/with space")),
    ],
)
def test_parse_url_splits_scheme_bucket_and_prefix(url: str, expected: tuple) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["", "s3://", "s3:///prefix", "s3://bucket/a/../b", "s3://bucket/a//b", "gs://bucket/a",
     "file://otherhost/data", "http://example.com/x"],
)  # fmt: skip
def test_parse_url_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(url)


def test_open_storage_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    s3 = open_storage("s3://bucket/some/prefix")
    assert isinstance(s3, S3Storage)
    assert s3.url == "s3://bucket/some/prefix"


def test_relative_local_paths_are_resolved_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage("out")
    monkeypatch.chdir("/")
    assert storage.url == (tmp_path / "out").as_posix()


# ---------------------------------------------------------------------------------------------
# Config: secrets never printed


def test_config_repr_masks_secrets() -> None:
    config = StorageConfig(access_key="AKIDEXAMPLE", secret_key=SECRET, session_token=TOKEN)
    for text in (repr(config), str(config), f"{config}", repr(S3Storage("b", "", config))):
        assert SECRET not in text
        assert TOKEN not in text
        assert "AKIDEXAMPLE" not in text
    assert "secret_key='***'" in repr(config)
    assert "session_token=None" in repr(StorageConfig())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"access_key": "only-the-id"},
        {"connect_timeout_s": 0},
        {"max_attempts": 0},
        {"multipart_chunksize": MiB},
        {"addressing_style": "sideways"},
        {"list_page_size": 1001},
    ],
)
def test_invalid_config_is_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        StorageConfig(**kwargs)


def test_invalid_config_message_never_contains_the_secret() -> None:
    with pytest.raises(ConfigError) as info:
        StorageConfig(secret_key=SECRET)
    assert SECRET not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Local folders


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


def test_local_write_then_read_round_trips(local: LocalStorage) -> None:
    local.write_bytes("a/b/c.bin", b"\x00\x01payload")
    assert local.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert local.exists("a/b/c.bin")
    assert local.local_path("a/b/c.bin").read_bytes() == b"\x00\x01payload"


def test_local_write_replaces_and_leaves_no_temp_files(local: LocalStorage) -> None:
    for i in range(5):
        local.write_bytes("dir/x.bin", bytes([i]) * 1000)
    assert local.read_bytes("dir/x.bin") == bytes([4]) * 1000
    assert os.listdir(local.local_path("dir")) == ["x.bin"]


def test_failed_local_write_keeps_the_old_file_and_no_temp(
    local: LocalStorage, monkeypatch
) -> None:
    local.write_bytes("x.bin", b"old")

    def broken_replace(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="cannot write"):
        local.write_bytes("x.bin", b"new")
    monkeypatch.undo()
    assert local.read_bytes("x.bin") == b"old"
    assert os.listdir(local.root) == ["x.bin"]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_local_operations_refuse_keys_that_escape_the_root(local: LocalStorage, key: str) -> None:
    for op in (
        lambda: local.write_bytes(key, b"x"),
        lambda: local.read_bytes(key),
        lambda: local.exists(key),
        lambda: local.delete(key),
        lambda: local.local_path(key),
        lambda: local.child(key),
    ):
        with pytest.raises(StorageError):
            op()
    assert not (local.root.parent / "x.png").exists()


def test_local_read_of_a_missing_key_is_not_found(local: LocalStorage) -> None:
    with pytest.raises(StorageNotFoundError, match="not found"):
        local.read_bytes("missing.png")
    assert not local.exists("missing.png")


def test_local_delete_is_idempotent(local: LocalStorage) -> None:
    local.write_bytes("x.bin", b"x")
    local.delete("x.bin")
    local.delete("x.bin")
    assert not local.exists("x.bin")


def _populate(storage, keys: list[str]) -> None:
    for key in keys:
        storage.write_bytes(key, key.encode())


def test_local_list_filters_by_suffix_case_insensitively(local: LocalStorage) -> None:
    _populate(local, ["a.png", "b.JPG", "c.txt", "d/e.PNG", "f.jpeg"])
    listed = [o.key for o in local.list(suffixes=(".png", ".jpg"))]
    assert listed == ["a.png", "b.JPG", "d/e.PNG"]
    assert [o.key for o in local.list(suffixes=".txt")] == ["c.txt"]


def test_local_list_orders_keys_like_s3(local: LocalStorage) -> None:
    keys = ["a/c", "a-b", "a0", "a/b/z", "b", "a.x"]
    _populate(local, keys)
    assert [o.key for o in local.list()] == sorted(keys)


def test_local_list_prefix_is_a_plain_string_prefix(local: LocalStorage) -> None:
    _populate(local, ["img/a.png", "img/b/c.png", "img2/d.png", "imgx.png", "other/e.png"])
    assert [o.key for o in local.list("img")] == [
        "img/a.png",
        "img/b/c.png",
        "img2/d.png",
        "imgx.png",
    ]
    assert [o.key for o in local.list("img/")] == ["img/a.png", "img/b/c.png"]
    assert [o.key for o in local.list("img/b")] == ["img/b/c.png"]
    assert list(local.list("nothing/")) == []


def test_local_list_reports_size_and_mtime(local: LocalStorage) -> None:
    local.write_bytes("x.bin", b"12345")
    (info,) = local.list()
    assert info.size == 5
    assert info.mtime is not None and info.mtime.tzinfo is not None
    assert info.etag is None


def test_local_list_hides_in_flight_temp_files(local: LocalStorage) -> None:
    local.write_bytes("x.png", b"x")
    (local.root / f"{LOCAL_TMP_PREFIX}y.png-123").write_bytes(b"partial")
    assert [o.key for o in local.list()] == ["x.png"]


def test_local_list_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert list(LocalStorage(tmp_path / "nope").list()) == []


def test_local_child_is_rooted_under_its_prefix(local: LocalStorage) -> None:
    runs = local.child("a").child("b/c")
    runs.write_bytes("x.png", b"x")
    assert local.read_bytes("a/b/c/x.png") == b"x"
    assert runs.url == (local.root / "a/b/c").as_posix()
    assert [o.key for o in runs.list()] == ["x.png"]
    assert [o.key for o in local.list()] == ["a/b/c/x.png"]


def test_local_check_creates_a_missing_destination(local: LocalStorage) -> None:
    local.check(create=True)
    assert local.root.is_dir()


def test_local_check_refuses_a_missing_source(local: LocalStorage) -> None:
    with pytest.raises(StorageNotFoundError, match="does not exist"):
        local.check()


def test_local_check_refuses_a_file_as_root(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(StorageError, match="not a folder"):
        LocalStorage(tmp_path / "f").check(create=True)


def test_only_local_storage_has_local_paths() -> None:
    with pytest.raises(StorageError, match="not a local folder"):
        S3Storage("bucket", "p").local_path("x.png")


# ---------------------------------------------------------------------------------------------
# S3 against moto


@pytest.fixture
def s3_config(moto_endpoint: str) -> StorageConfig:
    return StorageConfig(
        endpoint_url=moto_endpoint,
        region="us-east-1",
        access_key="testing",
        secret_key=SECRET,
        max_attempts=1,
    )


@pytest.fixture
def bucket(s3_config: StorageConfig) -> str:
    """A fresh bucket per test: tests never see each other's objects."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    S3Storage(name, "", s3_config).client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(bucket: str, s3_config: StorageConfig) -> S3Storage:
    return S3Storage(bucket, "archive/prefix", s3_config)


def _count_calls(storage: S3Storage, operation: str) -> list[int]:
    calls: list[int] = []
    storage.client.meta.events.register(
        f"after-call.s3.{operation}", lambda **_: calls.append(1), unique_id=uuid.uuid4().hex
    )
    return calls


def test_s3_write_then_read_round_trips(s3: S3Storage) -> None:
    s3.write_bytes("a/b.png", b"png-bytes")
    assert s3.read_bytes("a/b.png") == b"png-bytes"
    assert s3.exists("a/b.png")
    head = s3.client.head_object(Bucket=s3.bucket, Key="archive/prefix/a/b.png")
    assert head["ContentType"] == "image/png"


def test_s3_explicit_content_type_wins(s3: S3Storage) -> None:
    s3.write_bytes("x.bin", b"x", content_type="application/x-test")
    head = s3.client.head_object(Bucket=s3.bucket, Key="archive/prefix/x.bin")
    assert head["ContentType"] == "application/x-test"


def test_s3_missing_key_is_not_found(s3: S3Storage) -> None:
    with pytest.raises(
        StorageNotFoundError, match=r"s3://.*/archive/prefix/missing\.png not found"
    ):
        s3.read_bytes("missing.png")
    assert not s3.exists("missing.png")


def test_s3_delete_is_idempotent(s3: S3Storage) -> None:
    s3.write_bytes("x.bin", b"x")
    s3.delete("x.bin")
    s3.delete("x.bin")
    assert not s3.exists("x.bin")


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_s3_operations_refuse_keys_that_escape_the_prefix(key: str) -> None:
    # Refused before any request: the endpoint (port 9, discard) is never contacted.
    s3 = S3Storage("bucket", "archive/prefix", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    for op in (
        lambda: s3.write_bytes(key, b"x"),
        lambda: s3.read_bytes(key),
        lambda: s3.exists(key),
        lambda: s3.delete(key),
        lambda: s3.child(key),
    ):
        with pytest.raises(StorageError):
            op()


def test_s3_list_paginates_and_keys_are_relative_to_the_prefix(
    bucket: str, s3_config: StorageConfig
) -> None:
    config = StorageConfig(**{**s3_config.__dict__, "list_page_size": 7})
    s3 = S3Storage(bucket, "root", config)
    keys = [f"img/{i:03d}.png" for i in range(30)]
    _populate(s3, keys)
    s3.client.put_object(Bucket=bucket, Key="elsewhere/x.png", Body=b"x")
    calls = _count_calls(s3, "ListObjectsV2")
    listed = list(s3.list())
    assert [o.key for o in listed] == keys
    assert len(calls) == 5  # ceil(30 / 7)
    assert all(o.size == len(o.key) and o.etag and o.mtime for o in listed)


def test_s3_list_filters_by_prefix_and_suffix(s3: S3Storage) -> None:
    _populate(s3, ["a.png", "b.JPG", "c.txt", "d/e.PNG", "img/x.png", "img2/y.png"])
    assert [o.key for o in s3.list(suffixes=(".png", ".jpg"))] == [
        "a.png",
        "b.JPG",
        "d/e.PNG",
        "img/x.png",
        "img2/y.png",
    ]
    assert [o.key for o in s3.list("img/")] == ["img/x.png"]
    assert [o.key for o in s3.list("img")] == ["img/x.png", "img2/y.png"]


def test_s3_list_skips_folder_marker_objects(s3: S3Storage) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="archive/prefix/folder/", Body=b"")
    s3.write_bytes("folder/a.png", b"a")
    assert [o.key for o in s3.list()] == ["folder/a.png"]


def test_s3_child_is_rooted_under_its_prefix(s3: S3Storage) -> None:
    child = s3.child("runs").child("r1")
    child.write_bytes("samples.parquet", b"x")
    assert child.url == f"s3://{s3.bucket}/archive/prefix/runs/r1"
    assert s3.read_bytes("runs/r1/samples.parquet") == b"x"
    assert [o.key for o in child.list()] == ["samples.parquet"]


def test_s3_large_objects_use_multipart_upload(bucket: str, s3_config: StorageConfig) -> None:
    config = StorageConfig(
        **{**s3_config.__dict__, "multipart_threshold": MiB, "multipart_chunksize": 5 * MiB}
    )
    s3 = S3Storage(bucket, "big", config)
    parts = _count_calls(s3, "UploadPart")
    puts = _count_calls(s3, "PutObject")
    data = os.urandom(11 * MiB)
    s3.write_bytes("weights.bin", data)
    assert len(parts) == 3 and not puts
    assert s3.read_bytes("weights.bin") == data
    (info,) = s3.list()
    assert info.size == len(data) and info.etag.endswith("-3")


def test_s3_small_objects_use_one_put(s3: S3Storage) -> None:
    parts = _count_calls(s3, "UploadPart")
    s3.write_bytes("small.bin", b"x" * 1000)
    assert not parts


def test_s3_check_passes_for_an_existing_bucket(s3: S3Storage) -> None:
    s3.check()


def test_s3_check_names_a_missing_bucket_and_the_endpoint(
    s3_config: StorageConfig, moto_endpoint: str
) -> None:
    storage = S3Storage("no-such-bucket", "", s3_config)
    with pytest.raises(StorageError) as info:
        storage.check()
    message = str(info.value)
    assert "bucket 'no-such-bucket' does not exist at endpoint" in message
    assert moto_endpoint in message
    assert not is_transient(info.value)


def test_s3_unreachable_endpoint_is_transient(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = StorageConfig(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key="k",
        secret_key=SECRET,
        max_attempts=1,
        connect_timeout_s=1,
        retry_budget_s=0,  # no waiting: the budget is specified below with a fake clock
    )
    with pytest.raises(TransientStorageError, match="cannot reach endpoint") as info:
        S3Storage("bucket", "", config).read_bytes("x.png")
    assert is_transient(info.value)
    assert SECRET not in str(info.value)


def _client_error(code: str, status: int, message: str = "msg") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("RequestTimeout", 400), True),
        (_client_error("TooManyRequests", 429), True),
        (_client_error("AccessDenied", 403), False),
        (_client_error("InvalidArgument", 400), False),
        (EndpointConnectionError(endpoint_url="http://x"), True),
    ],
)
def test_only_retryable_failures_are_transient(exc: Exception, transient: bool) -> None:
    error = S3Storage("bucket", "", StorageConfig(endpoint_url="http://x"))._error(exc, "read", "k")
    assert isinstance(error, StorageError)
    assert is_transient(error) is transient


def test_access_denied_message_says_what_to_check_and_hides_the_secret() -> None:
    storage = S3Storage("bucket", "", StorageConfig(access_key="AK", secret_key=SECRET))
    error = storage._error(_client_error("AccessDenied", 403, f"echo {SECRET}"), "read", "k.png")
    assert "access denied" in str(error) and "AWS_ACCESS_KEY_ID" in str(error)
    assert SECRET not in str(error)
    other = storage._error(_client_error("InvalidArgument", 400, f"echo {SECRET}"), "read", "k")
    assert SECRET not in str(other) and "***" in str(other)


def test_s3_storage_pickles_without_its_client(s3: S3Storage) -> None:
    s3.write_bytes("x.bin", b"x")
    clone = pickle.loads(pickle.dumps(s3))
    assert clone.url == s3.url and clone._client is None
    assert clone.read_bytes("x.bin") == b"x"


def test_s3_endpoint_from_the_environment_is_used(
    bucket: str, moto_endpoint: str, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage = open_storage(f"s3://{bucket}/env")
    storage.write_bytes("x.bin", b"x")
    assert (
        boto3.client("s3", endpoint_url=moto_endpoint)
        .get_object(Bucket=bucket, Key="env/x.bin")["Body"]
        .read()
        == b"x"
    )


# ---------------------------------------------------------------------------------------------
# Local folders: symbolic links and special files never lead outside the root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the root holding a file that must never be read through the root."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.png").write_bytes(b"outside-secret")
    return folder


def test_local_link_leading_outside_is_listed_but_never_read(
    local: LocalStorage, outside: Path
) -> None:
    local.write_bytes("ok.png", b"inside")
    (local.root / "photo.png").symlink_to(outside / "secret.png")

    assert [o.key for o in local.list()] == ["ok.png", "photo.png"]  # shown, to be reported
    with pytest.raises(StorageError, match="outside that folder") as info:
        local.read_bytes("photo.png")
    assert not isinstance(info.value, StorageNotFoundError) and not is_transient(info.value)
    assert not local.exists("photo.png")


def test_local_link_within_the_root_is_followed(local: LocalStorage) -> None:
    local.write_bytes("real/a.png", b"inside")
    (local.root / "alias.png").symlink_to(local.root / "real" / "a.png")

    assert local.read_bytes("alias.png") == b"inside"
    assert {o.key: o.size for o in local.list()}["alias.png"] == len(b"inside")


def test_local_folder_linked_from_outside_is_neither_walked_nor_written_through(
    local: LocalStorage, outside: Path
) -> None:
    local.check(create=True)
    (local.root / "linked").symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in outside.iterdir())

    assert list(local.list()) == [] and list(local.list("linked/")) == []
    for op in (
        lambda: local.read_bytes("linked/secret.png"),
        lambda: local.write_bytes("linked/new.png", b"x"),
        lambda: local.delete("linked/secret.png"),
    ):
        with pytest.raises(StorageError, match="outside that folder"):
            op()
    assert sorted(p.name for p in outside.iterdir()) == before
    assert (outside / "secret.png").read_bytes() == b"outside-secret"


def test_local_dangling_link_is_listed_and_reads_as_not_found(local: LocalStorage) -> None:
    local.check(create=True)
    (local.root / "gone.png").symlink_to(local.root / "missing.png")

    assert [o.key for o in local.list()] == ["gone.png"]
    with pytest.raises(StorageNotFoundError):
        local.read_bytes("gone.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_local_fifo_is_listed_but_refused_without_blocking(local: LocalStorage) -> None:
    local.check(create=True)
    os.mkfifo(local.root / "pipe.png")  # opening it for reading would wait for a writer forever

    assert [o.key for o in local.list()] == ["pipe.png"]
    with pytest.raises(StorageError, match="FIFO"):
        local.read_bytes("pipe.png")


# ---------------------------------------------------------------------------------------------
# The retry budget (a fake clock: no test waits)


class FakeClock:
    """`clock` and `sleep` for `retry_transient`: sleeping advances the clock, instantly."""

    def __init__(self, request_s: float = 0.0) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.request_s = request_s  # how long each attempt takes

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _failing(clock: FakeClock, failures: int, error: Exception | None = None):
    """A call that fails `failures` times (transient by default), then returns "done"."""
    calls: list[float] = []

    def call() -> str:
        calls.append(clock.now)
        clock.now += clock.request_s
        if len(calls) <= failures:
            raise error or TransientStorageError("cannot read s3://b/x.png: cannot reach endpoint")
        return "done"

    return call, calls


def test_backoff_doubles_from_half_a_second_up_to_a_ten_second_cap() -> None:
    from pulse_core.storage import backoff_s

    nominal = [backoff_s(n, 1.0) for n in range(1, 9)]
    assert nominal == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert [backoff_s(n, 0.0) for n in range(1, 4)] == [0.25, 0.5, 1.0]  # jitter: half to all
    assert backoff_s(10_000, 0.5) == 7.5  # no overflow on a very long outage


def test_transient_failures_are_retried_until_the_call_succeeds() -> None:
    from pulse_core.storage import retry_transient

    clock = FakeClock()
    call, calls = _failing(clock, failures=4)

    result = retry_transient(
        call, budget_s=300, clock=clock.clock, sleep=clock.sleep, jitter=lambda: 1.0
    )

    assert result == "done" and len(calls) == 5
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]


def test_retries_stop_at_the_budget_with_a_message_naming_the_setting() -> None:
    from pulse_core.storage import RETRY_BUDGET_ENV, RetryBudgetExhaustedError, retry_transient

    clock = FakeClock(request_s=1.0)  # each attempt itself takes a second
    call, calls = _failing(clock, failures=10_000)

    with pytest.raises(RetryBudgetExhaustedError) as info:
        retry_transient(call, budget_s=20, clock=clock.clock, sleep=clock.sleep, jitter=lambda: 1)

    # Attempts of 1 s after sleeps of 0.5, 1, 2, 4 s: the 5th ends at 12.5 s; the next sleep
    # (8 s) is cut to end at the budget, and the 6th attempt, started at 20 s, is the last.
    assert [t - calls[0] for t in calls] == [0, 1.5, 3.5, 6.5, 11.5, 20]
    error = info.value
    assert isinstance(error, TransientStorageError) and is_transient(error)
    assert (error.attempts, error.retried_s) == (6, 21)
    message = str(error)
    assert "cannot read s3://b/x.png" in message  # what failed
    assert "after 21 s of retries (6 attempts" in message  # for how long
    assert "retry budget is 20 s" in message and RETRY_BUDGET_ENV in message  # what raises it


def test_permanent_errors_are_not_retried() -> None:
    from pulse_core.storage import retry_transient

    clock = FakeClock()
    call, calls = _failing(clock, failures=1, error=StorageError("access denied"))

    with pytest.raises(StorageError, match="access denied") as info:
        retry_transient(call, budget_s=300, clock=clock.clock, sleep=clock.sleep)

    assert not is_transient(info.value) and len(calls) == 1 and clock.sleeps == []


def test_a_budget_of_zero_means_no_retries_beyond_botocores() -> None:
    from pulse_core.storage import RetryBudgetExhaustedError, retry_transient

    clock = FakeClock()
    call, calls = _failing(clock, failures=1)

    with pytest.raises(RetryBudgetExhaustedError):
        retry_transient(call, budget_s=0, clock=clock.clock, sleep=clock.sleep)
    assert len(calls) == 1 and clock.sleeps == []


def test_an_exhausted_budget_is_not_spent_again_by_an_outer_retry() -> None:
    from pulse_core.storage import RetryBudgetExhaustedError, retry_transient

    clock = FakeClock()
    inner = RetryBudgetExhaustedError("inner gave up", retried_s=20, attempts=7)
    call, calls = _failing(clock, failures=1, error=inner)

    with pytest.raises(RetryBudgetExhaustedError) as info:
        retry_transient(call, budget_s=300, clock=clock.clock, sleep=clock.sleep)
    assert info.value is inner and len(calls) == 1


def test_the_budget_defaults_to_minutes_and_the_environment_overrides_it(monkeypatch) -> None:
    from pulse_core.storage import DEFAULT_RETRY_BUDGET_S, RETRY_BUDGET_ENV

    monkeypatch.delenv(RETRY_BUDGET_ENV, raising=False)
    assert StorageConfig().effective_retry_budget_s() == DEFAULT_RETRY_BUDGET_S == 300.0
    monkeypatch.setenv(RETRY_BUDGET_ENV, "20")
    config = StorageConfig()
    assert config.effective_retry_budget_s() == 20.0
    # Read where the request is made: a config pickled to a worker follows the worker's env.
    clone = pickle.loads(pickle.dumps(config))
    monkeypatch.setenv(RETRY_BUDGET_ENV, "45.5")
    assert clone.effective_retry_budget_s() == 45.5
    assert StorageConfig(retry_budget_s=5).effective_retry_budget_s() == 5.0  # the field wins
    monkeypatch.setenv(RETRY_BUDGET_ENV, "five minutes")
    with pytest.raises(ConfigError, match=RETRY_BUDGET_ENV):
        StorageConfig().effective_retry_budget_s()


@pytest.mark.parametrize("budget", [-1, float("inf"), float("nan")])
def test_invalid_retry_budgets_are_refused(budget: float) -> None:
    with pytest.raises(ConfigError, match="retry_budget_s"):
        StorageConfig(retry_budget_s=budget)


def test_an_exhausted_budget_error_pickles_with_its_fields() -> None:
    from pulse_core.storage import RetryBudgetExhaustedError

    error = pickle.loads(pickle.dumps(RetryBudgetExhaustedError("gave up", 21.5, 7)))
    assert (str(error), error.retried_s, error.attempts) == ("gave up", 21.5, 7)


def _fail_first(storage: S3Storage, operation: str, failures: int) -> list[int]:
    """Make the first `failures` `operation` requests fail as if the endpoint were down."""
    sent: list[int] = []

    def before_send(**_: object) -> None:
        sent.append(1)
        if len(sent) <= failures:
            raise EndpointConnectionError(endpoint_url="http://down")

    storage.client.meta.events.register(
        f"before-send.s3.{operation}", before_send, unique_id=uuid.uuid4().hex
    )
    return sent


@pytest.fixture
def quick_backoff(monkeypatch) -> None:
    """Sleeps of milliseconds, so that real requests can be retried without slowing the tests."""
    import pulse_core.storage

    monkeypatch.setattr(pulse_core.storage, "RETRY_FIRST_SLEEP_S", 0.01)
    monkeypatch.setattr(pulse_core.storage, "RETRY_MAX_SLEEP_S", 0.02)


@pytest.mark.usefixtures("quick_backoff")
def test_s3_reads_writes_and_deletes_ride_out_dropped_connections(s3: S3Storage) -> None:
    s3.write_bytes("x.png", b"payload")
    puts, gets = _fail_first(s3, "PutObject", 2), _fail_first(s3, "GetObject", 3)
    heads, deletes = _fail_first(s3, "HeadObject", 1), _fail_first(s3, "DeleteObject", 1)

    s3.write_bytes("y.png", b"second")
    assert s3.read_bytes("x.png") == b"payload"
    assert s3.exists("y.png")
    s3.delete("y.png")

    assert (len(puts), len(gets), len(heads), len(deletes)) == (3, 4, 2, 2)
    assert not s3.exists("y.png")


@pytest.mark.usefixtures("quick_backoff")
def test_s3_listing_retries_one_page_without_repeating_keys(
    bucket: str, s3_config: StorageConfig
) -> None:
    s3 = S3Storage(bucket, "root", StorageConfig(**{**s3_config.__dict__, "list_page_size": 2}))
    keys = [f"img/{i}.png" for i in range(5)]
    _populate(s3, keys)
    sent: list[int] = []

    def second_page_fails_once(**_: object) -> None:
        sent.append(1)
        if len(sent) == 2:
            raise EndpointConnectionError(endpoint_url="http://down")

    s3.client.meta.events.register(
        "before-send.s3.ListObjectsV2", second_page_fails_once, unique_id=uuid.uuid4().hex
    )

    assert [o.key for o in s3.list()] == keys
    assert len(sent) == 4  # 3 pages, the second one twice


def test_s3_access_denied_is_not_retried(s3: S3Storage) -> None:
    from botocore.awsrequest import AWSResponse

    sent: list[int] = []

    def deny(**_: object) -> AWSResponse:
        sent.append(1)
        body = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
        return AWSResponse("http://x", 403, {}, _RawBody(body))

    s3.client.meta.events.register("before-send.s3.GetObject", deny, unique_id=uuid.uuid4().hex)

    with pytest.raises(StorageError, match="access denied") as info:
        s3.read_bytes("x.png")
    assert not is_transient(info.value) and len(sent) == 1


class _RawBody:
    """The minimal raw stream botocore reads an HTTP body from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self._data


def test_check_fails_fast_without_spending_the_budget(monkeypatch) -> None:
    import socket
    import time

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = StorageConfig(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key="k",
        secret_key=SECRET,
        max_attempts=1,
        retry_budget_s=300,
    )
    started = time.monotonic()
    with pytest.raises(TransientStorageError, match="cannot reach endpoint"):
        S3Storage("bucket", "", config).check()
    assert time.monotonic() - started < 60  # generous: it takes milliseconds, not the budget


def test_a_storage_with_a_zero_budget_gives_up_at_once(s3: S3Storage) -> None:
    from pulse_core.storage import DEFAULT_RETRY_BUDGET_S, RetryBudgetExhaustedError

    s3.write_bytes("x.png", b"payload")
    quick = s3.with_retry_budget(0)
    sent = _fail_first(quick, "GetObject", 1)

    with pytest.raises(RetryBudgetExhaustedError, match="retry budget is 0 s"):
        quick.read_bytes("x.png")
    assert len(sent) == 1 and quick.url == s3.url
    assert s3.config.retry_budget_s is None  # the original keeps its budget
    assert s3.config.effective_retry_budget_s() == DEFAULT_RETRY_BUDGET_S
    local = LocalStorage("/tmp")
    assert local.with_retry_budget(0) is local
