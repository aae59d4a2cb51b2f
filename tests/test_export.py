"""ONNX export: names, dynamic axes, the KV cache, and the three export modes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from loraexport.errors import OutputExistsError
from loraexport.lora.adapter import Adapter
from loraexport.models.reference import load_model
from loraexport.pipeline import export, unmerged_model
from loraexport.runtime import OnnxModel, empty_past

# ORT vs torch float32 on a width-16 model: a handful of roundings, O(1) logits.
ATOL = 1e-5


def _inputs(batch: int, seq: int, seed: int = 0, seq2seq: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 14, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    out = {"input_ids": ids, "attention_mask": mask}
    if seq2seq:
        out["decoder_input_ids"] = torch.randint(4, 14, (batch, seq), generator=g)
    return out


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
    x = _inputs(batch, seq)
    with torch.no_grad():
        want = ref(**x).numpy()
    got = OnnxModel(seq2seq_onnx).forward(**{k: v.numpy() for k, v in x.items()})
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= ATOL


@pytest.mark.parametrize("which", ["seq2seq", "causal"])
def test_cached_decoding_matches_full_forward(which, request):
    """Feeding tokens one by one through present → past gives the full-forward logits."""
    onnx_dir = request.getfixturevalue(f"{which}_onnx")
    m = OnnxModel(onnx_dir)
    x = {k: v.numpy() for k, v in _inputs(2, 6, seed=3, seq2seq=which == "seq2seq").items()}
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
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= ATOL


def test_unmerged_and_base_modes(seq2seq_base, seq2seq_adapter, seq2seq_onnx, tmp_path):
    export(seq2seq_base, tmp_path / "unmerged", adapter=seq2seq_adapter, mode="unmerged")
    export(seq2seq_base, tmp_path / "base")
    x = {k: v.numpy() for k, v in _inputs(2, 5).items()}
    merged = OnnxModel(seq2seq_onnx).forward(**x)
    unmerged = OnnxModel(tmp_path / "unmerged").forward(**x)
    base = OnnxModel(tmp_path / "base").forward(**x)
    assert np.abs(merged - unmerged).max() <= ATOL
    assert np.abs(merged - base).max() > 1e-3  # the base export really lacks the adapter
    init = lambda d: len(onnx.load(str(d / "decoder.onnx")).graph.initializer)  # noqa: E731
    assert init(tmp_path / "unmerged") > init(seq2seq_onnx)  # LoRA A and B are in that graph
    meta = json.loads((tmp_path / "base" / "loraexport.json").read_text())
    assert meta["mode"] == "base" and "adapters" not in meta["inputs"]


def test_existing_output_is_refused(seq2seq_base, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export(seq2seq_base, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_external_data_above_the_threshold(causal_base, causal_adapter, tmp_path, monkeypatch, exporter):
    """Graphs whose weights pass EXTERNAL_DATA_BYTES (protobuf's 2 GB limit, lowered here) are
    written as <name>.onnx + <name>.onnx.data, load in onnxruntime and keep parity."""
    from loraexport.export import onnx as onnx_export
    from loraexport.pipeline import verify

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
