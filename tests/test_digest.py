"""The input folder's sha256 in loraexport.json (``core.io.sha256_dir``), read in a thread while the
graphs are written (``DirDigest``): the same digest as read in turn, its errors raised to the caller,
and stopped when the export fails."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from loraexport.core.io import Cancelled, DirDigest, sha256_dir, sha256_file
from loraexport.errors import InputNotFoundError


def _folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "sub" / "w.bin").write_bytes(os.urandom(3 << 20))
    return tmp_path


def test_the_digest_covers_names_and_contents(tmp_path):
    d = _folder(tmp_path)
    want = hashlib.sha256()
    for name in ("a.json", "sub/w.bin"):  # sorted by path, each name then its file's digest
        want.update(name.encode())
        want.update(hashlib.sha256((d / name).read_bytes()).hexdigest().encode())
    assert sha256_dir(d) == want.hexdigest()
    before = sha256_dir(d)
    (d / "a.json").write_text('{"x": 2}')  # a changed file changes it
    assert sha256_dir(d) != before


def test_the_threaded_digest_is_the_same_as_in_turn(tmp_path):
    d = _folder(tmp_path)
    with DirDigest(d) as digest:
        assert digest.result() == sha256_dir(d)
        assert digest.result() == sha256_dir(d)  # asked twice: the same answer


def test_an_unreadable_file_raises_its_error_in_the_callers_thread(tmp_path, monkeypatch):
    import loraexport.core.io as io

    def unreadable(path, stop=None):  # (as root every file is readable: the error is planted)
        raise InputNotFoundError(f"cannot read {path}/w.bin: Permission denied")

    monkeypatch.setattr(io, "sha256_dir", unreadable)
    with DirDigest(_folder(tmp_path)) as digest, pytest.raises(InputNotFoundError, match="cannot read"):
        digest.result()


def test_a_stop_ends_the_reading_at_the_next_chunk(tmp_path):
    f = tmp_path / "big.bin"
    f.write_bytes(b"\0" * (4 << 20))
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        sha256_file(f, chunk=1 << 20, stop=stop)


def test_leaving_the_block_early_stops_the_thread(tmp_path):
    d = _folder(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="the export failed"), DirDigest(d) as digest:
        raise RuntimeError("the export failed")
    assert not digest._thread.is_alive()  # joined on the way out, not left reading
    assert time.perf_counter() - t0 < 5
