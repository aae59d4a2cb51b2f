"""Where an output may go (``output/plan.py``): outputs and report files checked against the
inputs and what is there before any work; stale temporary folders of dead runs removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from clihelp import previous_output

from loraexport.artifact.output import plan_files, plan_output
from loraexport.errors import OutputExistsError, OutputNotWritableError, UsageError


def test_existing_output_refused_without_force(tmp_path):
    previous_output(tmp_path / "out")
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
        target = previous_output(tmp_path / "target")
        out.symlink_to(target)
    with pytest.raises(OutputExistsError, match="only a previous output|link"):
        plan_output(out, force=True)


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


def test_scratch_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """A run killed with SIGKILL (``kill -9`` while it verifies) leaves its scratch folder beside
    the output (``.loraexport-chunks-BOOT-PID-*``, hard links to the weights); the next run there
    removes it: its process is gone, or it is of another boot. A live run's, and a folder of
    another name, stay (issue 26)."""
    from loraexport.artifact.output.plan import boot_id, scratch_prefix

    killed = subprocess.run(
        [sys.executable, "-c", (
            "import os, signal, sys; sys.path.insert(0, sys.argv[1]); "
            "from loraexport.verify.chunked import scratch_dir; from pathlib import Path; "
            "d = scratch_dir(Path(sys.argv[2]) / 'out', 'chunks'); "
            "open(d + '/model.onnx.data', 'w').write('x'); "
            "os.kill(os.getpid(), signal.SIGKILL)"
        ), str(Path(__file__).resolve().parents[2]), str(tmp_path)],
        capture_output=True,
    )  # fmt: skip
    assert killed.returncode == -9
    (left,) = tmp_path.glob(".loraexport-chunks-*")
    other_boot = (
        tmp_path / f".loraexport-base-{'f' * 8 if boot_id() != 'f' * 8 else '0' * 8}-{os.getppid()}-abcd1234"
    )
    other_boot.mkdir()
    live = tmp_path / f"{scratch_prefix('chunks')}abcd1234"  # this process's: alive
    live.mkdir()
    unrelated = tmp_path / ".loraexport-notes"
    unrelated.mkdir()
    plan = plan_output(tmp_path / "out")
    assert sorted(plan.removed_stale) == sorted([left, other_boot])
    assert not left.exists() and not other_boot.exists() and live.is_dir() and unrelated.is_dir()


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
