"""``loraexport.output``: outputs checked against inputs before any work, written into a
temporary folder and swapped in atomically, never replacing what they were not told to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import loraexport.output as lout
from loraexport.errors import OutputExistsError, OutputNotWritableError, OutputTakenError, UsageError
from loraexport.output import plan_files, plan_output, swap, write_files, write_output
from loraexport.untrusted import read_json


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


def _previous_output(path: Path, *files: str) -> Path:
    """A folder as loraexport leaves it: its files and loraexport.json."""
    path.mkdir()
    for f in files:
        (path / f).write_text(f)
    (path / "loraexport.json").write_text("{}")
    return path


def _write(out: Path, force: bool = False, **inputs) -> None:
    with write_output(plan_output(out, force=force, inputs=inputs)) as tmp:
        (tmp / "new.txt").write_text("new")


# ---- checks before any work ----------------------------------------------------------------------
def test_existing_output_refused_without_force(tmp_path):
    _previous_output(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="--force"):
        plan_output(tmp_path / "out")
    assert plan_output(tmp_path / "out", force=True).path == tmp_path / "out"


@pytest.mark.parametrize("relation", ["is", "contains", "sits inside"])
@pytest.mark.parametrize("force", [False, True])
def test_output_may_never_be_contain_or_sit_inside_an_input(tmp_path, relation, force):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    out = {"is": base, "contains": tmp_path / "models", "sits inside": base / "out"}[relation]
    with pytest.raises(UsageError, match=f"{relation} the --base") as e:
        plan_output(out, force=force, inputs={"--base": base})
    assert str(out) in str(e.value) and str(base) in str(e.value)


def test_links_are_resolved_both_ways(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "link-to-base").symlink_to(base)
    with pytest.raises(UsageError, match="is the --base"):
        plan_output(tmp_path / "link-to-base", force=True, inputs={"--base": base})
    with pytest.raises(UsageError, match="sits inside the --base"):
        plan_output(tmp_path / "link-to-base" / "out", inputs={"--base": base})
    with pytest.raises(UsageError, match="contains the --adapter"):  # the input given through a link
        plan_output(tmp_path / "x", inputs={"--adapter": tmp_path / "x" / "ad"})


def test_a_file_input_inside_the_output_is_refused(tmp_path):
    data = tmp_path / "d" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    with pytest.raises(UsageError, match="contains the --data"):
        plan_output(tmp_path / "d", force=True, inputs={"--data": data, "--eval-data": None})


@pytest.mark.parametrize("given", ["", ".", "..", "/", "a/.."])
def test_names_that_name_no_output(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="does not name|is empty"):
        plan_output(given, force=True)


def test_names_too_long_are_refused_before_work(tmp_path):
    with pytest.raises(UsageError, match="too long"):
        plan_output(tmp_path / "new" / ("x" * 250))
    with pytest.raises(UsageError, match="too long"):
        plan_output(tmp_path / ("y" * 300) / "out")
    assert list(tmp_path.iterdir()) == []


def test_parent_must_be_a_writable_folder(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OutputNotWritableError, match="not a directory"):
        plan_output(tmp_path / "file" / "out")


@pytest.mark.parametrize("kind", ["folder", "file", "link"])
def test_force_replaces_only_a_previous_output(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif kind == "file":
        out.write_text("a file")
    else:
        target = _previous_output(tmp_path / "target")
        out.symlink_to(target)
    with pytest.raises(OutputExistsError, match="only a previous output|link"):
        plan_output(out, force=True)


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
    out = _previous_output(tmp_path / "out", "old.txt")
    with write_output(plan_output(out, force=True)) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible before success
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "new.txt"]  # and its manifest
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("exc", [RuntimeError("fail"), KeyboardInterrupt()])
def test_failure_leaves_the_previous_output_untouched(tmp_path, exc):
    out = _previous_output(tmp_path / "out", "keep.bin")
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(type(exc)), write_output(plan_output(out, force=True)) as tmp:
        (tmp / "partial").write_text("x")
        raise exc
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert _leftovers(tmp_path, "out") == []


def test_output_gets_the_users_permissions_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        _write(tmp_path / "out")
    finally:
        os.umask(old)
    assert lout.dir_mode(tmp_path / "out") == 0o755


def test_a_folder_created_meanwhile_is_left_alone(tmp_path):
    """Another program creates --out while this run works: the swap must not remove it."""
    out = tmp_path / "out"
    with pytest.raises(OutputTakenError, match="left alone"), write_output(plan_output(out)) as tmp:
        (tmp / "new.txt").write_text("new")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_an_empty_folder_created_meanwhile_is_left_alone_too(tmp_path):
    """rename(2) silently replaces an empty folder; RENAME_NOREPLACE does not."""
    out = tmp_path / "out"
    with pytest.raises(OutputTakenError), write_output(plan_output(out)) as tmp:
        (tmp / "new.txt").write_text("new")
        out.mkdir()
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_previous_output_replaced_meanwhile_is_put_back(tmp_path):
    """--force was told to replace one folder; if another took its place, that one stays."""
    out = _previous_output(tmp_path / "out", "old.txt")
    with pytest.raises(OutputTakenError), write_output(plan_output(out, force=True)) as tmp:
        (tmp / "new.txt").write_text("new")
        shutil.rmtree(out)
        _previous_output(out, "theirs.txt")
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "theirs.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_swap_without_renameat2_still_never_replaces(tmp_path, monkeypatch):
    """Where renameat2 is missing (not Linux, an old file system): the portable fallback."""
    monkeypatch.setattr(swap, "_renameat2_fn", None)
    out = _previous_output(tmp_path / "out", "old.txt")
    _write(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "new.txt"]
    with pytest.raises(OutputTakenError), write_output(plan_output(tmp_path / "new")) as tmp:
        (tmp / "f").write_text("x")
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / "theirs").write_text("x")
    assert _leftovers(tmp_path, "out") == [] and _leftovers(tmp_path, "new") == []


def test_interrupt_just_after_the_swap_keeps_the_new_output_and_says_so(tmp_path, monkeypatch):
    """Ctrl-C held back during the swap arrives right after it: the new output is whole and
    stays, the old one is cleaned up, and the exception says the output was written."""
    import contextlib

    out = _previous_output(tmp_path / "out", "old.txt")

    @contextlib.contextmanager
    def deferred_then_delivered():
        yield
        raise KeyboardInterrupt  # delivered as the signal mask is lifted

    monkeypatch.setattr(swap, "signals_deferred", deferred_then_delivered)
    with pytest.raises(KeyboardInterrupt) as info, write_output(plan_output(out, force=True)) as tmp:
        (tmp / "new.txt").write_text("new")
    assert info.value.loraexport_written == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["loraexport.json", "new.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_stale_temporary_folders_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-0123abcd"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"x")
    alive = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"  # a live process's: not ours to remove
    alive.mkdir()
    other = tmp_path / f".other.tmp-{pid}-0123abcd"  # another output's
    other.mkdir()
    plan = plan_output(tmp_path / "out")
    assert plan.removed_stale == [stale] and not stale.exists()
    assert alive.is_dir() and other.is_dir()


# ---- report files ------------------------------------------------------------------------------------
def _report_plan(path: Path, force: bool = False, **inputs):
    return plan_files([path, path.with_suffix(".md")], force=force, inputs=inputs)


def test_report_files_follow_the_output_rules(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "x"}')
    with pytest.raises(UsageError, match="sits inside the --base"):
        _report_plan(base / "config.json", force=True, **{"--base": base})
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--force"):
        _report_plan(tmp_path / "notes.json")
    with pytest.raises(OutputExistsError, match="not a loraexport report"):
        _report_plan(tmp_path / "notes.json", force=True)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(OutputExistsError, match="is a folder"):
        _report_plan(tmp_path / "dir.json", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotWritableError, match="not a directory"):
        _report_plan(tmp_path / "file" / "report.json")
    assert (base / "config.json").read_text() == '{"model_type": "x"}'


def test_report_files_written_and_replaced_only_when_ours(tmp_path):
    path = tmp_path / "r" / "report.json"
    plan = _report_plan(path)
    ours = json.dumps({"versions": {"loraexport": "0.1.0"}})
    write_files(plan, {path: ours, path.with_suffix(".md"): "# loraexport report\n"})
    assert read_json(path, ValueError) == {"versions": {"loraexport": "0.1.0"}}
    plan = _report_plan(path, force=True)
    write_files(plan, {path: ours, path.with_suffix(".md"): "# loraexport report\nagain\n"})
    assert path.with_suffix(".md").read_text().endswith("again\n")
    assert _leftovers(path.parent, "report.json") == []
