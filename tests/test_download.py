"""Specification of `download`: resumable, checksummed, atomic HTTP downloads.

Every test talks to an `http.server` on 127.0.0.1 started here; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pulse_core.errors import ModelFileError
from pulse_core.generators.download import DownloadResult, download, part_path, sha256_file

CONTENT = os.urandom(300_000) + b"end of model"  # several chunks at the tests' chunk size
DIGEST = hashlib.sha256(CONTENT).hexdigest()
CHUNK = 64 * 1024
ETAG = '"v1"'


@dataclass
class Site:
    """What the test server serves, how it misbehaves, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    # path -> behaviour: "range" (default), "ignore-range", "404", "403", "corrupt",
    # "503-once", "drop-once" (first response stops halfway), "no-validator"
    behaviour: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, str | None]] = field(default_factory=list)

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r["path"] == path)


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            site.requests.append(
                {
                    "path": self.path,
                    "range": self.headers.get("Range"),
                    "if_range": self.headers.get("If-Range"),
                }
            )
            behaviour = site.behaviour.get(self.path, "range")
            first = site.count(self.path) == 1
            if behaviour in ("404", "403") or self.path not in site.files:
                self.send_error(int(behaviour) if behaviour in ("404", "403") else 404)
                return
            if behaviour == "503-once" and first:
                self.send_error(503)
                return
            body = site.files[self.path]
            if behaviour == "corrupt":
                body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
            wanted = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            honour = behaviour not in ("ignore-range",) and wanted is not None
            if honour and self.headers.get("If-Range") not in (None, ETAG):
                honour = False  # the client's copy is of another version: send it all
            if honour:
                assert wanted is not None
                start = int(wanted.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                body = body[start:]
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            if behaviour != "no-validator":
                self.send_header("ETag", ETAG)
            self.end_headers()
            if behaviour == "drop-once" and first:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def site() -> Iterator[tuple[Site, str]]:
    """A local HTTP server and its base URL (http://127.0.0.1:PORT)."""
    state = Site(files={"/model.bin": CONTENT})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _get(url: str, dest: Path, **kwargs: Any) -> DownloadResult:
    """`download` with the tests' defaults: the right checksum, no retries, no waiting."""
    kwargs.setdefault("sha256", DIGEST)
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("backoff", 0.0)
    return download(url, dest, chunk_bytes=CHUNK, **kwargs)


# --------------------------------------------------------------------------------------------------


def test_download_lands_verified_file_at_dest(site: tuple[Site, str], tmp_path: Path) -> None:
    _, base = site
    dest = tmp_path / "models" / "model.bin"
    result = download(base + "/model.bin", dest, sha256=DIGEST, backoff=0.0)
    assert dest.read_bytes() == CONTENT
    assert (result.sha256, result.size, result.verified, result.resumed) == (
        DIGEST,
        len(CONTENT),
        True,
        False,
    )
    assert not part_path(dest).exists()


def test_checksum_is_compared_case_insensitively(site: tuple[Site, str], tmp_path: Path) -> None:
    _, base = site
    result = _get(base + "/model.bin", tmp_path / "m.bin", sha256=DIGEST.upper())
    assert result.sha256 == DIGEST


def test_resume_sends_range_request_for_existing_part(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    state, base = site
    dest = tmp_path / "model.bin"
    part_path(dest).write_bytes(CONTENT[:100_000])
    result = _get(base + "/model.bin", dest)
    assert state.requests[-1]["range"] == "bytes=100000-"
    assert result.resumed
    assert dest.read_bytes() == CONTENT


def test_server_ignoring_range_restarts_from_byte_zero(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    state, base = site
    state.behaviour["/model.bin"] = "ignore-range"
    dest = tmp_path / "model.bin"
    part_path(dest).write_bytes(CONTENT[:100_000])
    result = _get(base + "/model.bin", dest)
    assert state.requests[-1]["range"] == "bytes=100000-"  # asked, but got a 200
    assert not result.resumed
    assert dest.read_bytes() == CONTENT  # not the part followed by the whole file


def test_dropped_connection_is_resumed_within_one_call(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    state, base = site
    state.behaviour["/model.bin"] = "drop-once"
    dest = tmp_path / "model.bin"
    result = _get(base + "/model.bin", dest, retries=2)
    assert result.attempts == 2
    assert state.requests[1]["range"] == f"bytes={len(CONTENT) // 2}-"
    assert state.requests[1]["if_range"] == ETAG  # proves the kept bytes are the same version
    assert dest.read_bytes() == CONTENT


def test_transient_server_error_is_retried(site: tuple[Site, str], tmp_path: Path) -> None:
    state, base = site
    state.behaviour["/model.bin"] = "503-once"
    result = _get(base + "/model.bin", tmp_path / "model.bin", retries=1)
    assert result.attempts == 2


def test_retries_are_bounded_and_the_part_is_kept(site: tuple[Site, str], tmp_path: Path) -> None:
    state, base = site
    state.behaviour["/model.bin"] = "drop-once"
    dest = tmp_path / "model.bin"
    with pytest.raises(ModelFileError, match="after 1 attempt"):
        _get(base + "/model.bin", dest, retries=0)
    assert not dest.exists()
    assert part_path(dest).stat().st_size == len(CONTENT) // 2  # for the next run to resume
    _get(base + "/model.bin", dest)
    assert dest.read_bytes() == CONTENT


def test_not_found_fails_at_once_with_a_clear_error(site: tuple[Site, str], tmp_path: Path) -> None:
    state, base = site
    dest = tmp_path / "model.bin"
    with pytest.raises(ModelFileError, match=r"not found \(HTTP 404\).*pulse models import"):
        _get(base + "/missing.bin", dest, retries=3)
    assert state.count("/missing.bin") == 1  # a 404 is not retried
    assert not dest.exists()


def test_forbidden_fails_with_a_clear_error(site: tuple[Site, str], tmp_path: Path) -> None:
    state, base = site
    state.behaviour["/model.bin"] = "403"
    with pytest.raises(ModelFileError, match=r"refused access \(HTTP 403\)"):
        _get(base + "/model.bin", tmp_path / "model.bin", retries=3)
    assert state.count("/model.bin") == 1


def test_connection_refused_is_reported_as_such(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ModelFileError, match=r"connection refused by 127\.0\.0\.1"):
        _get(f"http://127.0.0.1:{port}/model.bin", tmp_path / "model.bin", retries=1)


def test_checksum_mismatch_deletes_the_file_and_never_writes_dest(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    state, base = site
    state.behaviour["/model.bin"] = "corrupt"
    dest = tmp_path / "model.bin"
    with pytest.raises(ModelFileError, match="checksum mismatch") as caught:
        _get(base + "/model.bin", dest)
    assert DIGEST in str(caught.value)
    assert hashlib.sha256(b"").hexdigest() not in str(caught.value)
    assert not dest.exists()
    assert not part_path(dest).exists()
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_keeps_an_existing_dest_untouched(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    state, base = site
    state.behaviour["/model.bin"] = "corrupt"
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"previous file")
    with pytest.raises(ModelFileError):
        _get(base + "/model.bin", dest)
    assert dest.read_bytes() == b"previous file"


def test_stale_partial_bytes_are_downloaded_again_once(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    state, base = site
    dest = tmp_path / "model.bin"
    part_path(dest).write_bytes(b"x" * 1000)  # bytes of another version of the file
    result = _get(base + "/model.bin", dest)
    assert [r["range"] for r in state.requests] == ["bytes=1000-", None]
    assert not result.resumed
    assert dest.read_bytes() == CONTENT


def test_complete_part_is_landed_after_416(site: tuple[Site, str], tmp_path: Path) -> None:
    state, base = site
    dest = tmp_path / "model.bin"
    part_path(dest).write_bytes(CONTENT)  # finished earlier, killed before the rename
    _get(base + "/model.bin", dest)
    assert dest.read_bytes() == CONTENT
    assert state.requests[-1]["range"] == f"bytes={len(CONTENT)}-"


def test_trust_on_first_use_returns_the_computed_checksum(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    _, base = site
    result = _get(base + "/model.bin", tmp_path / "model.bin", sha256=None)
    assert result.sha256 == DIGEST
    assert not result.verified


def test_without_checksum_an_unidentified_part_is_not_resumed(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    state, base = site
    dest = tmp_path / "model.bin"
    part_path(dest).write_bytes(b"x" * 1000)  # no record of the version it came from
    result = _get(base + "/model.bin", dest, sha256=None)
    assert state.requests[-1]["range"] is None
    assert result.sha256 == DIGEST


def test_matching_dest_is_not_downloaded_again(site: tuple[Site, str], tmp_path: Path) -> None:
    state, base = site
    dest = tmp_path / "model.bin"
    dest.write_bytes(CONTENT)
    result = _get(base + "/model.bin", dest)
    assert result.attempts == 0
    assert state.requests == []


def test_wrong_announced_size_is_refused_before_writing(
    site: tuple[Site, str], tmp_path: Path
) -> None:
    _, base = site
    dest = tmp_path / "model.bin"
    with pytest.raises(ModelFileError, match="bytes, expected 5:"):
        _get(base + "/model.bin", dest, expected_size=5)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_bytes_done_and_total(site: tuple[Site, str], tmp_path: Path) -> None:
    _, base = site
    calls: list[tuple[int, int | None]] = []
    _get(base + "/model.bin", tmp_path / "model.bin", progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, len(CONTENT))
    assert calls[-1] == (len(CONTENT), len(CONTENT))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_only_http_urls_are_accepted(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="only http"):
        download("file:///models/g.pt", tmp_path / "x", sha256=None)


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(CONTENT)
    assert sha256_file(path, chunk_bytes=4096) == DIGEST
