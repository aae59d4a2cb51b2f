"""The swap (``output/swap.py``): one atomic rename that never replaces what it was not told
to, also without renameat2, and a Ctrl-C just after it that keeps the new output."""

from __future__ import annotations

import contextlib
import shutil

import pytest
from clihelp import leftovers, previous_output

from loraexport.artifact.output import plan_output, swap, write_output
from loraexport.errors import OutputTakenError


def test_a_folder_created_meanwhile_is_left_alone(tmp_path):
    """Another program creates --out while this run works: the swap must not remove it."""
    out = tmp_path / "out"
    with pytest.raises(OutputTakenError, match="left alone"), write_output(plan_output(out)) as tmp:
        (tmp / "new.txt").write_text("new")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path, "out") == []


def test_an_empty_folder_created_meanwhile_is_left_alone_too(tmp_path):
    """rename(2) silently replaces an empty folder; RENAME_NOREPLACE does not."""
    out = tmp_path / "out"
    with pytest.raises(OutputTakenError), write_output(plan_output(out)) as tmp:
        (tmp / "new.txt").write_text("new")
        out.mkdir()
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_previous_output_replaced_meanwhile_is_put_back(tmp_path):
    """--force was told to replace one folder; if another took its place, that one stays."""
    out = previous_output(tmp_path / "out", "old.txt")
    with pytest.raises(OutputTakenError), write_output(plan_output(out, force=True)) as tmp:
        (tmp / "new.txt").write_text("new")
        shutil.rmtree(out)
        previous_output(out, "theirs.txt")
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "theirs.txt"]
    assert leftovers(tmp_path, "out") == []


def test_swap_without_renameat2_still_never_replaces(tmp_path, monkeypatch):
    """Where renameat2 is missing (not Linux, an old file system): the portable fallback."""
    monkeypatch.setattr(swap, "_renameat2_fn", None)
    out = previous_output(tmp_path / "out", "old.txt")
    with write_output(plan_output(out, force=True)) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "new.txt"]
    with pytest.raises(OutputTakenError), write_output(plan_output(tmp_path / "new")) as tmp:
        (tmp / "f").write_text("x")
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / "theirs").write_text("x")
    assert leftovers(tmp_path, "out") == [] and leftovers(tmp_path, "new") == []


def test_interrupt_just_after_the_swap_keeps_the_new_output_and_says_so(tmp_path, monkeypatch):
    """Ctrl-C held back during the swap arrives right after it: the new output is whole and
    stays, the old one is cleaned up, and the exception says the output was written."""
    out = previous_output(tmp_path / "out", "old.txt")

    @contextlib.contextmanager
    def deferred_then_delivered():
        yield
        raise KeyboardInterrupt  # delivered as the signal mask is lifted

    monkeypatch.setattr(swap, "signals_deferred", deferred_then_delivered)
    with pytest.raises(KeyboardInterrupt) as info, write_output(plan_output(out, force=True)) as tmp:
        (tmp / "new.txt").write_text("new")
    assert info.value.loraexport_written == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "new.txt"]
    assert leftovers(tmp_path, "out") == []
