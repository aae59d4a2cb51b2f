"""Every output directory lists the sha256 of its files; ``verify --check-files`` re-checks them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from artifacts import copy_dir
from clihelp import needs_bin, ok, program, refused, run, untouched
from tamper import edit_meta

from loraexport.artifact.provenance import write as write_manifest


def _listed(directory: Path) -> dict[str, str]:
    return json.loads((directory / "loraexport.json").read_text())["files"]


def _all_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {
        "loraexport.json"
    }


def _assert_manifest_true(directory: Path) -> None:
    listed = _listed(directory)
    assert set(listed) == _all_files(directory)  # every file, nothing else
    for rel, digest in listed.items():
        assert hashlib.sha256((directory / rel).read_bytes()).hexdigest() == digest, rel


@pytest.mark.slow
def test_every_command_writes_a_true_manifest(seq2seq_base, seq2seq_adapter, seq2seq_onnx, tmp_path):
    _assert_manifest_true(seq2seq_onnx)  # export
    merged = tmp_path / "merged"
    ok(run("merge", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", merged))
    _assert_manifest_true(merged)  # merge (shards hashed in the background while merging)
    assert "loraexport.json" not in json.loads((merged / "merge.json").read_text()).get("files", {})
    adapter = tmp_path / "adapter"
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"source": s, "target": s[::-1]}) + "\n" for s in ("123", "4567", "89"))
    )
    held = tmp_path / "held.jsonl"  # --eval-data is never the --data file
    held.write_bytes(data.read_bytes())
    r = run(
        "train",
        "--base",
        seq2seq_base,
        "--data",
        data,
        "--eval-data",
        held,
        "--out",
        adapter,
        "--steps",
        "2",
        quiet=False,
    )
    ok(r)
    _assert_manifest_true(adapter)  # train
    ok(run("verify", "--check-files", adapter))
    # a manifest does not make an adapter or a merged model look like an ONNX export
    kinds = {
        d: json.loads(run("inspect", d, "--json").stdout)["kind"] for d in (adapter, merged, seq2seq_onnx)
    }
    assert kinds == {
        adapter: "PEFT LoRA adapter",
        merged: "model",
        seq2seq_onnx: "loraexport output",
    }


def test_check_files_passes_then_catches_changes(seq2seq_onnx, tmp_path):
    out = copy_dir(seq2seq_onnx, tmp_path / "onnx")
    assert "files match loraexport.json" in ok(run("verify", "--check-files", out)).stdout
    (out / "notes.txt").write_text("mine")  # an added file is reported, not a failure
    (out / "link").symlink_to("/etc/hostname")  # so is a link (never followed)
    r = run("verify", "--check-files", out, quiet=False)
    assert "notes.txt" in ok(r).stderr and "link" in r.stderr
    with open(out / "decoder.onnx", "r+b") as f:  # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    (out / "encoder.onnx").unlink()
    line = refused(run("verify", "--check-files", out), 4)
    what = "changed: decoder.onnx; missing: encoder.onnx"
    assert line == f"error: {out}: files do not match loraexport.json ({what})"


@pytest.mark.parametrize("listed", [{}, {"decoder.onnx"}])
def test_a_table_that_leaves_a_graph_out_checks_nothing_and_fails(seq2seq_onnx, tmp_path, listed):
    """loraexport.json rewritten to list no graph (its own digest recomputed): every file was
    "unlisted", reported only, and --check-files passed."""
    out = copy_dir(seq2seq_onnx, tmp_path / "onnx")
    edit_meta(out, lambda m: m.update(files={k: v for k, v in m["files"].items() if k in listed}))
    refused(run("verify", "--check-files", out), 4, "lists no sha256 for encoder.onnx, a graph of the export")


@pytest.mark.parametrize(
    "manifest, message",
    [
        (None, "loraexport.json"),
        ("not json", "loraexport.json"),
        ({"files": ["a"]}, 'has no "files" table'),
        ({"files": {"../escape": "00"}}, "outside"),
        ({"files": {"a/../../escape": "00"}}, "outside"),
        ({"files": {"/etc/hostname": "00"}}, "outside"),
        ({"files": {"a\u0000b": "00"}}, "not a usable path"),
        ({"files": {"": "00"}}, "not a usable path"),
        ({"files": {"./a": "00"}}, "not a usable path"),
        ({"files": {"a//b": "00"}}, "not a usable path"),
    ],
)
def test_check_files_bad_manifest(tmp_path, manifest, message):
    d = tmp_path / "out"
    d.mkdir()
    if manifest is not None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (d / "loraexport.json").write_text(text)
    refused(run("verify", "--check-files", d, quiet=False), 3, message)


def _replace(path: Path, how: str, outside: Path) -> None:
    """Put something that is not the file written at ``path``."""
    data = path.read_bytes()
    path.unlink()
    if how == "link inside":
        path.symlink_to("encoder.onnx")
    elif how == "link outside":
        path.symlink_to("/etc/hostname")
    elif how == "link to the same bytes outside":  # the digest would match: a link is a change
        (outside / "copy.onnx").write_bytes(data)
        path.symlink_to(outside / "copy.onnx")
    elif how == "relative link to the same bytes outside":
        (outside / "copy.onnx").write_bytes(data)
        path.symlink_to(os.path.relpath(outside / "copy.onnx", path.parent))
    elif how == "folder":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)


REPLACEMENTS = [
    "link inside",
    "link outside",
    "link to the same bytes outside",
    "relative link to the same bytes outside",
    "folder",
]


@pytest.mark.parametrize("how", REPLACEMENTS)
def test_a_listed_file_replaced_by_a_non_file_is_changed(seq2seq_onnx, tmp_path, how):
    """Nothing is followed: a link (wherever it leads), a folder is a changed file (exit 4), not
    an invalid manifest."""
    out = copy_dir(seq2seq_onnx, tmp_path / "onnx")
    (tmp_path / "elsewhere").mkdir()
    _replace(out / "decoder.onnx", how, tmp_path / "elsewhere")
    with untouched(tmp_path):
        line = refused(run("verify", "--check-files", out), 4, "changed: decoder.onnx")
        assert "missing" not in line
        r = run("verify", "--check-files", out, "--json")
        assert json.loads(r.stdout)["changed"] == ["decoder.onnx"] and r.exit_code == 4


@needs_bin
def test_a_listed_file_replaced_by_a_fifo_is_changed_without_blocking(seq2seq_onnx, tmp_path):
    """A FIFO would block whoever opens it for reading: it is never opened (a real process, with
    a timeout, so that a regression fails instead of hanging the suite)."""
    out = copy_dir(seq2seq_onnx, tmp_path / "onnx")
    _replace(out / "decoder.onnx", "fifo", tmp_path)
    refused(program("verify", "--check-files", out, timeout=120), 4, "changed: decoder.onnx")


def _nested_output(root: Path) -> Path:
    out = root / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "a.txt").write_text("written")
    (out / "top.txt").write_text("written too")
    write_manifest(out)
    return out


@pytest.mark.parametrize("how", ["link to a copy", "file", "gone"])
def test_a_listed_folder_replaced_is_changed_or_missing(tmp_path, how):
    """Every component of a listed path is checked unfollowed, not only the last one."""
    out = _nested_output(tmp_path)
    shutil.move(out / "sub", tmp_path / "sub-copy")
    if how == "link to a copy":
        (out / "sub").symlink_to(tmp_path / "sub-copy", target_is_directory=True)
    elif how == "file":
        (out / "sub").write_text("a file where the folder was")
    expected = "missing: sub/a.txt" if how == "gone" else "changed: sub/a.txt"
    line = refused(run("verify", "--check-files", out), 4, expected)
    assert "top.txt" not in line


def test_nested_output_passes_and_a_link_beside_is_only_reported(tmp_path):
    out = _nested_output(tmp_path)
    (out / "sub" / "loop").symlink_to("..", target_is_directory=True)  # never descended into
    r = run("verify", "--check-files", out, quiet=False)
    assert "2 files match" in ok(r).stdout and "sub/loop" in r.stderr


def test_a_manifest_that_is_a_link_is_refused(seq2seq_onnx, tmp_path):
    """The manifest is what the files are checked against: one borrowed from elsewhere is none."""
    out = copy_dir(seq2seq_onnx, tmp_path / "onnx")
    (out / "loraexport.json").rename(tmp_path / "manifest.json")
    (out / "loraexport.json").symlink_to(tmp_path / "manifest.json")
    refused(run("verify", "--check-files", out), 3, "loraexport.json", "symbolic link")


def test_analyze_output_has_a_true_manifest(seq2seq_base, seq2seq_adapter, tmp_path):
    out = tmp_path / "analysis"
    ok(run("analyze", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", out))
    _assert_manifest_true(out)
    ok(run("verify", "--check-files", out))
