"""The proof inside ``merge-and-export`` quantizes the graph this run exported again instead of
exporting the reference a second time (``stages.prove.FloatGraphs``). It must still fail when
that float graph is not the reference's export: each float weight is matched to the reference's
modules by value, bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hf_tiny import save_base_and_adapter
from tamper import edit_initializers

from loraexport.core.enums import ExportMode, Precision
from loraexport.stages.float_graphs import FloatGraphs
from loraexport.stages.graphs import export_into, export_subject, quantize_graphs
from loraexport.stages.inputs import load_inputs
from loraexport.stages.prove import prove_export

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(loaded, the float graph as exported, its meta) of a tiny Llama with its adapter merged."""
    root = tmp_path_factory.mktemp("llama")
    base, adapter = save_base_and_adapter("llama", root)
    loaded = load_inputs(base, [adapter])
    float_dir = root / "float"
    float_dir.mkdir()
    export_into(loaded, export_subject(loaded, ExportMode.MERGED, None), float_dir, {})
    return loaded, float_dir / "model.onnx"


def _export(float_graph, out, precision=Precision.INT8):
    """The file ``merge-and-export`` writes: the float graph, quantized."""
    out.mkdir()
    shutil.copy(float_graph, out / "model.onnx")
    quantize_graphs(out, ["model"], precision, None)
    return out, {"weights_dtype": precision.value, "mode": "merged"}


def _prove(loaded, kept_float, out, meta):
    keep = FloatGraphs(out)
    try:
        keep.keep(kept_float)
        return prove_export(loaded, out, meta, lambda *_: None, keep).proof
    finally:
        keep.close()


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.INT4])
def test_the_graph_this_run_exported_is_proven_without_exporting_again(made, precision, tmp_path):
    loaded, float_graph = made
    out, meta = _export(float_graph, tmp_path / "out", precision)
    proof = _prove(loaded, float_graph, out, meta)
    assert "quantized again" in proof.method
    assert proof.passed, proof.files[0].failures
    assert proof.files[0].quantized > 0 and proof.files[0].modules == proof.files[0].quantized
    assert not list(tmp_path.glob(".loraexport-float-graphs-*"))  # the hard links are removed


def test_a_float_graph_that_is_not_the_references_export_fails(made, tmp_path):
    """Planted: one weight of the float graph ×1.5, and the export made from it, so file and kept
    graph agree with each other and not with the reference."""
    loaded, float_graph = made
    (tmp_path / "wrong").mkdir()
    wrong = tmp_path / "wrong" / "model.onnx"
    shutil.copy(float_graph, wrong)

    def scale_one(arrays):
        name = sorted(n for n, a in arrays.items() if a.ndim == 2 and a.shape == (32, 32))[0]
        arrays[name] = arrays[name] * np.float32(1.5)

    edit_initializers(wrong, scale_one)
    out, meta = _export(wrong, tmp_path / "out")
    proof = _prove(loaded, wrong, out, meta)
    assert not proof.passed
    assert any("module" in f for f in proof.files[0].failures), proof.files[0].failures


def test_a_file_that_is_not_the_kept_graph_quantized_fails(made, tmp_path):
    """Planted: two quantized weights of the file swapped after quantizing."""
    loaded, float_graph = made
    out, meta = _export(float_graph, tmp_path / "out")

    def swap_two(arrays):
        a, b = sorted(n for n, x in arrays.items() if x.dtype == np.uint8 and x.ndim == 3)[:2]
        if arrays[a].shape == arrays[b].shape:
            arrays[a], arrays[b] = arrays[b].copy(), arrays[a].copy()
        else:
            arrays[a] = arrays[a] ^ np.uint8(1)

    edit_initializers(out / "model.onnx", swap_two)
    proof = _prove(loaded, float_graph, out, meta)
    assert not proof.passed
    assert any("differs" in f or "module" in f for f in proof.files[0].failures), proof.files[0].failures


def test_a_graph_with_external_data_is_copied_not_linked(tmp_path):
    """onnx refuses external data with more than one hard link: a link kept for the proof made the
    quantizer fail on every in-memory export over 1.8 GB (bench-bounded, --no-stream --quantize)."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"graph")
    (export / "model.onnx.data").write_bytes(b"weights")
    keep = FloatGraphs(export)
    try:
        keep.keep(export / "model.onnx")
        for name in ("model.onnx", "model.onnx.data"):
            assert (export / name).stat().st_nlink == 1
            assert (keep.dir / name).read_bytes() == (export / name).read_bytes()
    finally:
        keep.close()
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.onnx").write_bytes(b"graph and weights")
    keep = FloatGraphs(alone)
    try:
        keep.keep(alone / "model.onnx")  # replaced by a rename: a hard link keeps the float graph
        assert (keep.dir / "model.onnx").read_bytes() == b"graph and weights"
    finally:
        keep.close()
