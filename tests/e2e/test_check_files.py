"""Every output directory lists the sha256 of its files; ``verify --check-files`` re-checks them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from artifacts import copy_dir
from click.testing import CliRunner

from loraexport.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


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


def test_every_command_writes_a_true_manifest(seq2seq_base, seq2seq_adapter, seq2seq_onnx, tmp_path):
    _assert_manifest_true(seq2seq_onnx)  # export
    merged = tmp_path / "merged"
    assert _run("merge", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", merged).exit_code == 0
    _assert_manifest_true(merged)  # merge (shards hashed in the background while merging)
    assert "loraexport.json" not in json.loads((merged / "merge.json").read_text()).get("files", {})
    adapter = tmp_path / "adapter"
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"source": s, "target": s[::-1]}) + "\n" for s in ("123", "4567", "89"))
    )
    r = _run(
        "train", "--base", seq2seq_base, "--data", data, "--eval-data", data, "--out", adapter, "--steps", "2"
    )
    assert r.exit_code == 0, r.stderr
    _assert_manifest_true(adapter)  # train
    assert _run("verify", "--check-files", adapter).exit_code == 0
    # a manifest does not make an adapter or a merged model look like an ONNX export
    kinds = {
        d: json.loads(_run("inspect", d, "--json").stdout)["kind"] for d in (adapter, merged, seq2seq_onnx)
    }
    assert kinds == {
        adapter: "PEFT LoRA adapter",
        merged: "model",
        seq2seq_onnx: "loraexport output",
    }


def test_check_files_passes_then_catches_changes(seq2seq_onnx, tmp_path):
    out = copy_dir(seq2seq_onnx, tmp_path / "onnx")
    r = _run("verify", "--check-files", out)
    assert r.exit_code == 0 and "files match loraexport.json" in r.stdout
    (out / "notes.txt").write_text("mine")  # an added file is reported, not a failure
    (out / "link").symlink_to("/etc/hostname")  # so is a link (never followed)
    r = _run("verify", "--check-files", out)
    assert r.exit_code == 0 and "notes.txt" in r.stderr and "link" in r.stderr
    with open(out / "decoder.onnx", "r+b") as f:  # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    (out / "encoder.onnx").unlink()
    r = _run("verify", "--check-files", out)
    assert r.exit_code == 4
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {out}: files do not match loraexport.json (changed: decoder.onnx; missing: encoder.onnx)"
    )


@pytest.mark.parametrize(
    "manifest, message",
    [
        (None, "loraexport.json"),
        ("not json", "loraexport.json"),
        ({"files": ["a"]}, 'has no "files" table'),
        ({"files": {"../escape": "00"}}, "outside"),
        ({"files": {"a\u0000b": "00"}}, "not a usable path"),
    ],
)
def test_check_files_bad_manifest(tmp_path, manifest, message):
    d = tmp_path / "out"
    d.mkdir()
    if manifest is not None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (d / "loraexport.json").write_text(text)
    r = _run("verify", "--check-files", d)
    assert r.exit_code == 3 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_analyze_output_has_a_true_manifest(seq2seq_base, seq2seq_adapter, tmp_path):
    out = tmp_path / "analysis"
    r = _run("analyze", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", out)
    assert r.exit_code == 0, r.stderr
    _assert_manifest_true(out)
    assert _run("verify", "--check-files", out).exit_code == 0
