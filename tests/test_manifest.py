"""``manifest.py``: what a manifest lists (``files_in``), hashing in the background
(``Hasher``), and ``check_files``' verdict. The hostile cases (links, FIFOs, paths outside)
are tests/e2e/test_check_files.py, through the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from loraexport.artifact.manifest import MANIFEST, Hasher, check_files, check_manifest, files_in
from loraexport.artifact.provenance import write
from loraexport.errors import VerificationFailedError


def _tree(d: Path) -> Path:
    (d / "b" / "c").mkdir(parents=True)
    for rel in ("z.onnx", "a.json", "b/c/deep.bin", "b/x.txt"):
        (d / rel).write_text(rel)
    (d / "b" / "link").symlink_to(d / "z.onnx")
    (d / MANIFEST).write_text("{}")
    return d


def test_files_in_lists_regular_files_sorted_without_the_manifest_or_links(tmp_path):
    d = _tree(tmp_path / "out")
    assert [p.relative_to(d).as_posix() for p in files_in(d)] == [
        "a.json",
        "b/c/deep.bin",
        "b/x.txt",
        "z.onnx",
    ]


def test_hasher_gives_each_files_sha256(tmp_path):
    d = _tree(tmp_path / "out")
    hasher = Hasher()
    for p in files_in(d):
        hasher.submit(p)
    assert hasher.digests() == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files_in(d)}


def test_check_files_passes_an_unchanged_output_and_reports_added_files(tmp_path):
    d = _tree(tmp_path / "out")
    write(d)
    (d / "added.txt").write_text("mine")
    result = check_files(d)
    assert result.ok and result.checked == 4 and result.changed == result.missing == []
    assert result.unlisted == ["added.txt", "b/link"]  # reported, not a failure
    assert result.to_json() == {
        "directory": str(d),
        "ok": True,
        "checked": 4,
        "changed": [],
        "missing": [],
        "unlisted": ["added.txt", "b/link"],
        "description": "ok",
    }


def test_check_files_fails_naming_the_changed_and_missing_files(tmp_path):
    d = _tree(tmp_path / "out")
    write(d)
    (d / "b" / "x.txt").write_text("changed")
    (d / "z.onnx").unlink()
    with pytest.raises(VerificationFailedError) as e:
        check_files(d)
    assert str(e.value) == f"{d}: files do not match loraexport.json (changed: b/x.txt; missing: z.onnx)"
    assert e.value.report == check_manifest(d) and e.value.report.ok is False
    assert e.value.exit_code == 4
