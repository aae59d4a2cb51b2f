"""ONNX files from strangers, and interrupted exports: one line, a documented code, nothing lost."""

from __future__ import annotations

import os

import onnx
import pytest
from artifacts import copy_dir
from click.testing import CliRunner
from onnx import external_data_helper

from loraexport.cli import main
from loraexport.export import onnx as onnx_export


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _snapshot(root) -> dict[str, tuple[int, int]]:
    return {
        os.path.relpath(os.path.join(d, f), root): (
            os.stat(os.path.join(d, f)).st_size,
            os.stat(os.path.join(d, f)).st_mtime_ns,
        )
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname"])
def test_external_data_outside_the_model_dir_is_refused(
    causal_base, causal_adapter, causal_onnx, tmp_path, location
):
    onnx_dir = copy_dir(causal_onnx, tmp_path / "onnx")
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if len(t.raw_data) >= 256)
    external_data_helper.set_external_data(weight, location=location, offset=0, length=len(weight.raw_data))
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, str(path))
    before = _snapshot(tmp_path)
    r = _run("verify", "--base", causal_base, "--adapter", causal_adapter, "--onnx", onnx_dir, "--no-latency")
    assert r.exit_code == 3, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]  # progress lines aside
    assert len(errors) == 1 and "points outside" in errors[0] and location in errors[0]
    assert "Traceback" not in r.output
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["export", "merge-and-export"])
def test_sigint_during_export_leaves_nothing(causal_base, causal_adapter, tmp_path, monkeypatch, command):
    calls = []
    real = onnx_export._export_one

    def interrupted(spec, path, *args, **kwargs):
        real(spec, path, *args, **kwargs)  # a graph is on disk in the temporary folder ...
        calls.append(path)
        raise KeyboardInterrupt  # ... when Ctrl-C arrives

    monkeypatch.setattr(onnx_export, "_export_one", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier output")  # replaced only on success, with --force
    (out / "loraexport.json").write_text("{}")  # (--force replaces only a previous output)
    before = _snapshot(tmp_path)
    model_opt = "--model" if command == "export" else "--base"
    r = _run(command, model_opt, causal_base, "--adapter", causal_adapter, "--out", out, "--force")
    assert calls and r.exit_code == 130 and not calls[0].exists()  # the half-done graph was removed
    assert r.stderr.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert "Traceback" not in r.output
    assert _snapshot(tmp_path) == before  # the old output untouched, no temporary folder left


def _verify(base, adapter, onnx_dir):
    return _run(
        "verify", "--base", base, "--adapter", adapter, "--onnx", onnx_dir, "--no-latency", "--samples", "1"
    )


def _one_error_line(r, needle):
    errors = [line for line in r.stderr.splitlines() if line.startswith(("error", "internal error"))]
    assert r.exit_code == 3, r.output
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], errors
    assert "Traceback" not in r.output


def test_truncated_onnx_file_is_invalid_input(causal_base, causal_adapter, causal_onnx, tmp_path):
    onnx_dir = copy_dir(causal_onnx, tmp_path / "onnx")
    data = (onnx_dir / "model.onnx").read_bytes()
    (onnx_dir / "model.onnx").write_bytes(data[: len(data) // 3])
    before = _snapshot(tmp_path)
    _one_error_line(_verify(causal_base, causal_adapter, onnx_dir), "not a readable ONNX model")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("meta", ['{"model": {}}', "[1, 2]", '{"model": {"kind": "gan"}}', "{not json"])
def test_broken_export_description_is_invalid_input(causal_base, causal_adapter, causal_onnx, tmp_path, meta):
    onnx_dir = copy_dir(causal_onnx, tmp_path / "onnx")
    (onnx_dir / "loraexport.json").write_text(meta)
    _one_error_line(_verify(causal_base, causal_adapter, onnx_dir), "loraexport.json")


def test_external_data_of_a_constant_node_outside_the_dir_is_refused(
    causal_base, causal_adapter, causal_onnx, tmp_path
):
    """Not only initializers: a Constant node's tensor may point outside too."""
    onnx_dir = copy_dir(causal_onnx, tmp_path / "onnx")
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path))
    value = onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT, [16], bytes(64), raw=True)
    external_data_helper.set_external_data(value, location="../outside.bin", offset=0, length=64)
    value.ClearField("raw_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["planted_constant"], value=value))
    onnx.save(model, str(path))
    _one_error_line(_verify(causal_base, causal_adapter, onnx_dir), "points outside")
