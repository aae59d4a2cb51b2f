"""ONNX files from strangers, and interrupted exports: one line, a documented code, nothing lost."""

from __future__ import annotations

import onnx
import pytest
from artifacts import copy_dir
from clihelp import one_line, previous_output, refused, run, untouched
from onnx import external_data_helper

from loraexport.export import onnx as onnx_export


def _verify(base, adapter, onnx_dir):
    return run(
        "verify", "--base", base, "--adapter", adapter, "--onnx", onnx_dir, "--no-latency", "--samples", "1"
    )


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
    with untouched(tmp_path):
        refused(_verify(causal_base, causal_adapter, onnx_dir), 3, "points outside", location)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "merge-and-export"])
def test_sigint_during_export_leaves_nothing(causal_base, causal_adapter, tmp_path, monkeypatch, command):
    calls = []
    real = onnx_export._export_one

    def interrupted(spec, path, *args, **kwargs):
        real(spec, path, *args, **kwargs)  # a graph is on disk in the temporary folder ...
        calls.append(path)
        raise KeyboardInterrupt  # ... when Ctrl-C arrives

    monkeypatch.setattr(onnx_export, "_export_one", interrupted)
    out = previous_output(tmp_path / "out", "keep.txt")  # replaced only on success, with --force
    model_opt = "--model" if command == "export" else "--base"
    with untouched(tmp_path):  # the old output untouched, no temporary folder left
        r = run(command, model_opt, causal_base, "--adapter", causal_adapter, "--out", out, "--force")
        assert one_line(r, 130, "interrupted: ") == "interrupted: nothing was written"
    assert calls and not calls[0].exists()  # the half-done graph was removed


def test_truncated_onnx_file_is_invalid_input(causal_base, causal_adapter, causal_onnx, tmp_path):
    onnx_dir = copy_dir(causal_onnx, tmp_path / "onnx")
    data = (onnx_dir / "model.onnx").read_bytes()
    (onnx_dir / "model.onnx").write_bytes(data[: len(data) // 3])
    with untouched(tmp_path):
        refused(_verify(causal_base, causal_adapter, onnx_dir), 3, "not a readable ONNX model")


@pytest.mark.parametrize("meta", ['{"model": {}}', "[1, 2]", '{"model": {"kind": "gan"}}', "{not json"])
def test_broken_export_description_is_invalid_input(causal_base, causal_adapter, causal_onnx, tmp_path, meta):
    onnx_dir = copy_dir(causal_onnx, tmp_path / "onnx")
    (onnx_dir / "loraexport.json").write_text(meta)
    refused(_verify(causal_base, causal_adapter, onnx_dir), 3, "loraexport.json")


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
    refused(_verify(causal_base, causal_adapter, onnx_dir), 3, "points outside")
