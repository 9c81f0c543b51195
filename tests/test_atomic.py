"""pulse_core.atomic: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from pulse_core import atomic
from pulse_core.atomic import (
    LOCAL_TMP_PREFIX,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    replace_file,
)
from pulse_core.storage import LocalStorage


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bytes_are_written(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"\x00pulse\xff")
    assert target.read_bytes() == b"\x00pulse\xff"


def test_text_is_written_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    target = tmp_path / "note.txt"
    atomic_write_text(target, "Gauß ✓\n")
    assert target.read_bytes() == "Gauß ✓\n".encode()


def test_existing_file_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content, longer than the new one")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_missing_parent_folders_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(target, b"x")
    assert target.read_bytes() == b"x"


def test_success_leaves_no_temp_file(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"a")
    atomic_write_text(tmp_path / "b.txt", "b")
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"c")
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.bin"]


def test_atomic_path_hands_the_writer_a_hidden_temp_name_beside_the_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "fit.pt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(f"{LOCAL_TMP_PREFIX}fit.pt-")
        assert tmp.exists() and not target.exists()  # reserved (O_EXCL), nothing published yet
        tmp.write_bytes(b"fit")
    assert target.read_bytes() == b"fit"


def test_temp_files_are_hidden_from_local_storage_listings(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with atomic_path(tmp_path / "sample-0.png") as tmp:
        tmp.write_bytes(b"partial")
        assert [info.key for info in storage.list()] == []


def test_storage_and_atomic_share_one_temp_prefix() -> None:
    from pulse_core import storage

    assert storage.LOCAL_TMP_PREFIX is LOCAL_TMP_PREFIX == ".pulse-tmp-"


def test_failing_writer_leaves_the_original_untouched_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "fit.pt"
    target.write_bytes(b"original")
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new con")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"original"
    assert _names(tmp_path) == ["fit.pt"]


def test_failing_writer_creates_no_file_where_there_was_none(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert _names(tmp_path) == []


def test_failed_rename_leaves_the_original_untouched_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"original")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"original"
    assert _names(tmp_path) == ["out.bin"]


def test_concurrent_writers_of_one_path_never_produce_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "shared.bin"
    size = 1 << 20  # 1 MiB: many write() calls' worth, so interleaving would show
    writers, rounds = 4, 15
    payloads = [bytes([65 + i]) * size for i in range(writers)]
    torn: list[str] = []
    done = threading.Event()

    def write(payload: bytes) -> None:
        for _ in range(rounds):
            atomic_write_bytes(target, payload)

    def read() -> None:
        while not done.is_set():
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                continue  # before the first rename
            if len(data) != size or data.count(data[:1]) != size:
                torn.append(f"{len(data)} bytes, starting {data[:8]!r}")

    reader = threading.Thread(target=read)
    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()

    assert torn == []
    assert target.read_bytes() in payloads
    assert _names(tmp_path) == ["shared.bin"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_explicit_mode_is_set_exactly(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "secret.json"
    atomic_write_text(target, "{}", mode=mode)
    assert _mode(target) == mode


def test_a_secret_file_is_never_readable_by_others_even_while_written(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "state.json", mode=0o600) as tmp:
        assert _mode(tmp) & 0o077 == 0
        tmp.write_text('{"secret": 1}')
    assert _mode(tmp_path / "state.json") == 0o600


def test_explicit_mode_replaces_the_old_files_mode(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("{}")
    target.chmod(0o644)
    with atomic_path(target, mode=0o600) as tmp:
        tmp.write_text('{"secret": 1}')
    assert _mode(target) == 0o600


def test_default_mode_follows_the_umask_like_open(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "out.png", b"png")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "out.png") == 0o640  # not mkstemp's 0o600: outputs are shared


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_file_and_folder_are_fsynced_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_fsyncs(monkeypatch)
    atomic_write_bytes(tmp_path / "out.bin", b"x")
    assert len(calls) == 2  # the temp file before the rename, the folder after it


def test_fsync_false_skips_both_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_fsyncs(monkeypatch)
    atomic_write_bytes(tmp_path / "scratch.bin", b"x", fsync=False)
    assert calls == []
    assert (tmp_path / "scratch.bin").read_bytes() == b"x"


def test_replace_file_moves_a_finished_file_over_the_target(tmp_path: Path) -> None:
    part = tmp_path / "model.pt.part"
    part.write_bytes(b"all of it")
    (tmp_path / "model.pt").write_bytes(b"old")
    replace_file(part, tmp_path / "model.pt")
    assert _names(tmp_path) == ["model.pt"]
    assert (tmp_path / "model.pt").read_bytes() == b"all of it"


def test_new_file_mode_is_open_default_minus_umask() -> None:
    previous = os.umask(0o077)
    try:
        assert atomic.new_file_mode() == 0o600
    finally:
        os.umask(previous)
