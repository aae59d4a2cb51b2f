"""ONNX export (``export/onnx.py``): graph names, dynamic axes, the KV cache, external data,
opsets, and the exporter's console output captured at the fd level."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch
from artifacts import ORT_ATOL, random_batch
from clihelp import one_line_message

from loraexport.errors import ExportError, InvalidInputError
from loraexport.lora.adapter import Adapter
from loraexport.models.reference import load_model
from loraexport.runtime.model import OnnxModel, empty_past
from loraexport.stages.export import export
from loraexport.stages.merge import unmerged_model


def test_seq2seq_files_names_and_checker(seq2seq_onnx):
    meta = json.loads((seq2seq_onnx / "loraexport.json").read_text())
    assert meta["model"]["kind"] == "seq2seq" and meta["opset"] >= 18
    for name in ("encoder", "decoder"):
        model = onnx.load(str(seq2seq_onnx / f"{name}.onnx"))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version >= 18
    dec = onnx.load(str(seq2seq_onnx / "decoder.onnx"))
    names = [i.name for i in dec.graph.input]
    assert names[:4] == [
        "input_ids",
        "encoder_attention_mask",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    assert "encoder_key_values.1.value" in names
    assert [o.name for o in dec.graph.output][:2] == ["logits", "present.0.key"]


@pytest.mark.parametrize("batch,seq", [(1, 2), (3, 9), (8, 32)])
def test_dynamic_axes_and_parity(seq2seq_base, seq2seq_adapter, seq2seq_onnx, batch, seq):
    ref = unmerged_model(load_model(seq2seq_base), Adapter.load(seq2seq_adapter))
    x = random_batch(batch, seq)
    with torch.no_grad():
        want = ref(**x).numpy()
    got = OnnxModel(seq2seq_onnx).forward(**{k: v.numpy() for k, v in x.items()})
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= ORT_ATOL


@pytest.mark.parametrize("which", ["seq2seq", "causal"])
def test_cached_decoding_matches_full_forward(which, request):
    """Feeding tokens one by one through present → past gives the full-forward logits."""
    onnx_dir = request.getfixturevalue(f"{which}_onnx")
    m = OnnxModel(onnx_dir)
    x = {k: v.numpy() for k, v in random_batch(2, 6, seed=3, seq2seq=which == "seq2seq").items()}
    full = m.forward(**x)
    dec = m.sessions["decoder" if which == "seq2seq" else "model"]
    names = [o.name for o in dec.get_outputs()]
    past = empty_past(2, m.n_layers, m.n_heads, m.head_dim, np.float32)
    fixed = {}
    if which == "seq2seq":
        enc = m._run("encoder", {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]})
        fixed = {
            "encoder_attention_mask": x["attention_mask"],
            **{k: v for k, v in enc.items() if k.startswith("encoder_key_values.")},
        }
        stream = x["decoder_input_ids"]
    else:
        stream = x["input_ids"]
    steps = []
    for t in range(stream.shape[1]):
        feeds = {"input_ids": stream[:, t : t + 1], **past, **fixed}
        if which == "causal":
            feeds["attention_mask"] = np.ones((2, t + 1), dtype=np.int64)
        outs = dec.run(None, feeds)
        steps.append(outs[0])
        past = {
            n.replace("present.", "past_key_values."): o
            for n, o in zip(names, outs, strict=True)
            if n.startswith("present.")
        }
        assert past["past_key_values.0.key"].shape[2] == t + 1  # the cache grows by one per step
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= ORT_ATOL


@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "torchscript"])
def test_external_data_above_the_threshold(causal_base, causal_adapter, tmp_path, monkeypatch, exporter):
    """Graphs whose weights pass EXTERNAL_DATA_BYTES (protobuf's 2 GB limit, lowered here) are
    written as <name>.onnx + <name>.onnx.data, load in onnxruntime and keep parity."""
    from loraexport.export import onnx as onnx_export
    from loraexport.stages.verify import verify

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    export(causal_base, tmp_path / "out", adapter=causal_adapter, exporter=exporter)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "loraexport.json",
        "model.onnx",
        "model.onnx.data",
    ]
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # the weights live in the one data file beside it
    report = verify(causal_base, causal_adapter, tmp_path / "out", samples=2, latency=False)
    assert report.passed


# ---- opsets: refused before exporting, read back after ---------------------------------------------
@pytest.mark.parametrize(
    "exporter, opset",
    [
        ("dynamo", 17),
        ("dynamo", 29),
        ("dynamo", 99),
        ("torchscript", 21),
        ("torchscript", 99),
        ("dynamo", True),
    ],
)
def test_an_opset_the_exporter_cannot_write_is_refused_before_exporting(
    causal_base, tmp_path, monkeypatch, exporter, opset
):
    from loraexport.export import onnx as onnx_export

    def never(*args, **kwargs):
        raise AssertionError("the exporter ran")

    monkeypatch.setattr(onnx_export, "_export_one", never)
    with pytest.raises(InvalidInputError, match=f"opset {opset!r}.*{exporter}") as e:
        export(causal_base, tmp_path / "out", opset=opset, exporter=exporter)
    one_line_message(e)
    assert not (tmp_path / "out").exists()


def test_opset_range_matches_the_libraries():
    """The maxima are what torch, onnx and onnxruntime honour; a version bump that changes them
    fails here rather than writing opset 18 files labelled otherwise."""
    import onnxruntime as ort
    from torch.onnx import _constants

    from loraexport.export.onnx import MAX_OPSET, MAX_OPSETS, MIN_OPSET

    assert MAX_OPSETS["torchscript"] == _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    assert MAX_OPSETS["dynamo"] == onnx.defs.onnx_opset_version() == MAX_OPSET
    assert MIN_OPSET == 18
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", MAX_OPSET)],
    )
    ort.InferenceSession(model.SerializeToString())  # onnxruntime loads the newest we write


@pytest.mark.parametrize(
    "exporter, opset", [pytest.param("dynamo", 19, marks=pytest.mark.slow), ("torchscript", 20)]
)
def test_the_opset_written_is_the_one_recorded(causal_base, causal_adapter, tmp_path, exporter, opset):
    from loraexport.export.onnx import opset_written

    out = tmp_path / "out"
    result = export(causal_base, out, adapter=causal_adapter, opset=opset, exporter=exporter)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    in_file = {o.domain: o.version for o in model.opset_import}[""]
    assert result.opset == in_file == opset_written(out / "model.onnx") == opset
    assert json.loads((out / "loraexport.json").read_text())["opset"] == opset
    x = {k: v.numpy() for k, v in random_batch(2, 4, seq2seq=False).items()}
    assert np.isfinite(OnnxModel(out).forward(**x)).all()


@pytest.mark.slow
def test_an_exporter_that_writes_another_opset_fails(causal_base, tmp_path, monkeypatch):
    """The dynamo exporter silently writes opset 18 when it cannot convert: not a success."""
    from loraexport.export import onnx as onnx_export

    real = onnx_export._export_one
    monkeypatch.setattr(onnx_export, "_export_one", lambda spec, path, opset, *a: real(spec, path, 18, *a))
    with pytest.raises(ExportError, match="opset 19 was asked for, the exporter wrote opset 18"):
        export(causal_base, tmp_path / "out", opset=19)
    assert not (tmp_path / "out").exists()


# ---- the exporter's console output: captured at the fd level too --------------------------------
MARKS = ("python-print", "fd1-write", "fd2-write", "c-printf")


def _noisy(real):
    """``_export_one`` that also writes everywhere an exporter's C++ or Python half may."""
    import ctypes

    def export_one(*args):
        print(MARKS[0])
        os.write(1, f"{MARKS[1]}\n".encode())
        os.write(2, f"{MARKS[2]}\n".encode())
        ctypes.CDLL(None).printf(f"{MARKS[3]}\n".encode())  # buffered in C's stdio
        return real(*args)

    return export_one


def _fd_ids() -> list[tuple[int, int]]:
    return [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]


@pytest.mark.slow
def test_exporter_output_is_captured_at_the_fd_level(causal_base, tmp_path, monkeypatch, capfd):
    from loraexport.export import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "_export_one", _noisy(onnx_export._export_one))
    fds = _fd_ids()
    result = export(causal_base, tmp_path / "out")
    seen = capfd.readouterr()
    for mark in MARKS:
        assert mark not in seen.out + seen.err, mark
        assert mark in result.exporter_log, mark
    assert _fd_ids() == fds
    print("after")  # the fds and sys.stdout are the test's again
    assert capfd.readouterr().out == "after\n"
    assert not any(p.name.startswith(".exporter-output") for p in (tmp_path / "out").iterdir())


@pytest.mark.slow
def test_fds_are_restored_on_keyboard_interrupt(causal_base, tmp_path, monkeypatch, capfd):
    from loraexport.export import onnx as onnx_export

    noisy = _noisy(onnx_export._export_one)

    def interrupted(*args):
        noisy(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_export_one", interrupted)
    fds, stdout, stderr = _fd_ids(), sys.stdout, sys.stderr
    with pytest.raises(KeyboardInterrupt):
        export(causal_base, tmp_path / "out")
    assert _fd_ids() == fds and sys.stdout is stdout and sys.stderr is stderr
    seen = capfd.readouterr()
    assert not any(mark in seen.out + seen.err for mark in MARKS)
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"
    assert not (tmp_path / "out").exists()


def test_restoring_the_fds_survives_an_interrupt_midway(tmp_path, capfd):
    """Ctrl-C while the fds are being put back: they are put back all the same, then it is raised."""
    import io as std_io

    from loraexport.export import onnx as onnx_export

    real_dup2, calls = os.dup2, []

    def dup2_interrupted_once(fd, fd2, *a):
        calls.append(fd2)
        if len(calls) == 2:  # fd 1 put back ... Ctrl-C before fd 2
            raise KeyboardInterrupt
        return real_dup2(fd, fd2, *a)

    fds = _fd_ids()
    with pytest.MonkeyPatch.context() as mp:
        with pytest.raises(KeyboardInterrupt), onnx_export._fd_output_to(std_io.StringIO(), tmp_path):
            mp.setattr(os, "dup2", dup2_interrupted_once)
    assert calls == [1, 2, 1, 2]
    assert _fd_ids() == fds
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
