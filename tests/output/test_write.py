"""Writing an output (``output/write.py``): into a temporary folder beside it, moved into place
on success only, with its parents made (and removed again on failure) and the user's permissions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from clihelp import leftovers, previous_output

from loraexport.artifact.output import dir_mode, plan_files, plan_output, write_files, write_output
from loraexport.core.untrusted import read_json


def _write(out: Path, force: bool = False) -> None:
    with write_output(plan_output(out, force=force)) as tmp:
        (tmp / "new.txt").write_text("new")


def test_empty_folder_may_be_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    _write(tmp_path / "out", force=True)
    assert (tmp_path / "out" / "new.txt").read_text() == "new"


# ---- the write and the swap ------------------------------------------------------------------------
def test_missing_parents_are_created_and_removed_on_failure(tmp_path):
    with pytest.raises(RuntimeError), write_output(plan_output(tmp_path / "a" / "b" / "out")) as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []  # a/ and a/b/ were this run's: gone again
    _write(tmp_path / "a" / "b" / "out")
    assert (tmp_path / "a" / "b" / "out" / "new.txt").is_file()


def test_success_replaces_a_previous_output(tmp_path):
    out = previous_output(tmp_path / "out", "old.txt")
    with write_output(plan_output(out, force=True)) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible before success
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "new.txt"]  # and its manifest
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("exc", [RuntimeError("fail"), KeyboardInterrupt()])
def test_failure_leaves_the_previous_output_untouched(tmp_path, exc):
    out = previous_output(tmp_path / "out", "keep.bin")
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(type(exc)), write_output(plan_output(out, force=True)) as tmp:
        (tmp / "partial").write_text("x")
        raise exc
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert leftovers(tmp_path, "out") == []


def test_output_gets_the_users_permissions_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        _write(tmp_path / "out")
    finally:
        os.umask(old)
    assert dir_mode(tmp_path / "out") == 0o755


def test_report_files_written_and_replaced_only_when_ours(tmp_path):
    path = tmp_path / "r" / "report.json"
    plan = plan_files([path, path.with_suffix(".md")])
    ours = json.dumps({"versions": {"loraexport": "0.1.0"}})
    write_files(plan, {path: ours, path.with_suffix(".md"): "# loraexport report\n"})
    assert read_json(path, ValueError) == {"versions": {"loraexport": "0.1.0"}}
    plan = plan_files([path, path.with_suffix(".md")], force=True)
    write_files(plan, {path: ours, path.with_suffix(".md"): "# loraexport report\nagain\n"})
    assert path.with_suffix(".md").read_text().endswith("again\n")
    assert leftovers(path.parent, "report.json") == []
