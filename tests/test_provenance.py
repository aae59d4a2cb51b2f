"""``provenance.py``, the one writer of ``loraexport.json``: the sha256 of every file, the
description and inputs it is given, the versions that made them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loraexport.artifact.manifest import MANIFEST, check_manifest, description_digest
from loraexport.artifact.provenance import export_description, path_entry, versions, write
from loraexport.export.onnx import ExportResult

VERSION_KEYS = {"loraexport", "torch", "onnx", "onnxruntime", "python"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _output(d: Path) -> Path:
    """A finished output: two files, one in a subfolder, a link, and a stale manifest."""
    (d / "sub").mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"\x08\x01graph")
    (d / "sub" / "notes.txt").write_text("written")
    (d / "link").symlink_to(d / "model.onnx")  # links are never hashed
    (d / MANIFEST).write_text('{"files": {"old": "00"}}')
    return d


def test_one_file_lists_every_file_with_its_sha256(tmp_path):
    d = _output(tmp_path / "out")
    written = write(d)
    files = {
        "model.onnx": _sha(d / "model.onnx"),
        "sub/notes.txt": _sha(d / "sub" / "notes.txt"),  # relative, with forward slashes
    }  # not loraexport.json itself, not the link; no versions without a description
    assert written == {"files": files, "sha256": description_digest({"files": files})}
    assert json.loads((d / MANIFEST).read_text()) == written  # the file holds what was returned
    assert (d / MANIFEST).read_text().endswith("}\n")
    assert check_manifest(d).ok and check_manifest(d).checked == 2  # the reader agrees


def test_a_manifest_shows_a_change_after_it_was_written(tmp_path):
    d = _output(tmp_path / "out")
    write(d)
    (d / "model.onnx").write_bytes(b"\x08\x01other")
    assert check_manifest(d).changed == ["model.onnx"]


def test_meta_is_kept_and_versions_added(tmp_path):
    d = _output(tmp_path / "out")
    meta = {"model": {"kind": "causal"}, "inputs": {"base": path_entry("runs/base", "ab" * 32)}}
    written = write(d, meta)
    assert written["model"] == {"kind": "causal"}
    assert written["inputs"]["base"] == {"path": "runs/base", "sha256": "ab" * 32}
    assert set(written["versions"]) == VERSION_KEYS and written["versions"] == versions()
    assert set(written) == {"model", "inputs", "versions", "files", "sha256"}
    assert "versions" not in meta and "files" not in meta  # the caller's dict is left as it was


def test_versions_given_are_not_replaced(tmp_path):
    d = _output(tmp_path / "out")
    written = write(d, {"versions": {"loraexport": "0.0.1"}})
    assert written["versions"] == {"loraexport": "0.0.1"}


def test_known_digests_are_reused(tmp_path, monkeypatch):
    """Digests a ``Hasher`` computed while the command worked are not computed again; a path
    given another way (relative, through a link) is the same file."""
    d = _output(tmp_path / "out")
    (tmp_path / "via").symlink_to(d, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    known = {Path("out/model.onnx"): "1" * 64, tmp_path / "via" / "sub" / "notes.txt": "2" * 64}
    written = write(d, known=known)
    assert written["files"] == {"model.onnx": "1" * 64, "sub/notes.txt": "2" * 64}


def test_an_empty_output_lists_no_files(tmp_path):
    (tmp_path / "out").mkdir()
    # no description: no versions either; the digest of what it says, always
    assert write(tmp_path / "out") == {"files": {}, "sha256": description_digest({"files": {}})}
    written = write(tmp_path / "out", {})  # a description, still empty: it records what made it
    assert set(written) == {"versions", "files", "sha256"} and written["files"] == {}


def test_versions_are_strings():
    v = versions()
    assert set(v) == VERSION_KEYS and all(isinstance(x, str) and x for x in v.values())


def test_export_description():
    model = {"kind": "seq2seq", "special_tokens": {"bos": 1}, "name": "m", "family": "reference"}
    result = ExportResult(
        files=["encoder.onnx", "decoder.onnx"],
        opset=19,
        exporter="torchscript",
        inputs={"encoder": ["input_ids"], "decoder": ["input_ids", "encoder_attention_mask"]},
        outputs={"encoder": ["encoder_key_values.0.key"], "decoder": ["logits"]},
    )
    meta = export_description(model, result, "bfloat16", "merged")
    assert meta == {
        "model": model,
        "opset": 19,
        "exporter": "torchscript",
        "weights_dtype": "bfloat16",
        "graphs": {
            "encoder": {"inputs": ["input_ids"], "outputs": ["encoder_key_values.0.key"]},
            "decoder": {"inputs": ["input_ids", "encoder_attention_mask"], "outputs": ["logits"]},
        },
        "mode": "merged",
    }
    assert export_description(model, result, "bfloat16", "merged", streamed=True)["streamed"] is True
