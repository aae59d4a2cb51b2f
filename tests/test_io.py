"""Output directories: refused when present without --force; replaced atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from loraexport.errors import OutputExistsError, OutputNotWritableError
from loraexport.io import atomic_output_dir, check_output, sha256_dir


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


def test_check_output_refuses_existing_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        check_output(tmp_path / "out", force=False)
    assert check_output(tmp_path / "out", force=True) == tmp_path / "out"


def test_missing_parents_are_created_but_a_file_parent_is_refused(tmp_path):
    with atomic_output_dir(tmp_path / "a" / "b") as tmp:
        (tmp / "x.txt").write_text("x")
    assert (tmp_path / "a" / "b" / "x.txt").read_text() == "x"
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OutputNotWritableError, match="not a directory"):
        check_output(tmp_path / "file" / "out", force=False)


def test_atomic_output_success_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible before success
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "new.txt"]  # and its manifest
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("exc", [RuntimeError("fail"), KeyboardInterrupt()])
def test_atomic_output_failure_leaves_previous_untouched(tmp_path, exc):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.bin").write_bytes(b"\x00keep")
    digest = sha256_dir(out)
    with pytest.raises(type(exc)), atomic_output_dir(out, force=True) as tmp:
        (tmp / "partial").write_text("x")
        raise exc
    assert sha256_dir(out) == digest
    assert _leftovers(tmp_path, "out") == []


def test_atomic_output_failure_creates_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_output_dir(tmp_path / "new") as tmp:
        (tmp / "f").write_text("x")
        raise ValueError
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path, "new") == []


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError])
def test_failed_swap_restores_the_previous_output(tmp_path, monkeypatch, fault):
    """A failure (or Ctrl-C) between moving the old output aside and moving the new one in
    puts the old one back: the previous output is never lost."""
    import loraexport.io as lio

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # moving the new output into place
            raise fault()
        return real(src, dst)

    monkeypatch.setattr(lio.os, "replace", replace)
    with pytest.raises((fault, lio.OutputNotWritableError)), atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_interrupt_just_after_the_swap_keeps_the_new_output_and_says_so(tmp_path, monkeypatch):
    """Ctrl-C held back during the swap arrives right after it: the new output is whole and
    stays, the old one is cleaned up, and the exception says the output was written."""
    import loraexport.io as lio

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real, calls = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 1:  # removing the old output: the delayed signal lands here
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(lio.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt) as info, atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert info.value.loraexport_written == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "new.txt"]
    assert _leftovers(tmp_path, "out") == []
