"""``verify.chunked``: the fused graph cut where its layers meet and run a chunk at a time gives
exactly the numbers of the whole graph (teacher-forced logits and greedy tokens), for float32,
quantized and biased (Qwen2) exports, whatever the chunk size."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from artifacts import make_hf_decoder, make_peft_adapter
from clihelp import ok, run

from loraexport.runtime.model import OnnxModel
from loraexport.verify.chunked import ChunkedDecoder, _plan, cut, is_fused

IDS = np.array([[5, 17, 3, 44, 9, 71, 2], [0, 0, 0, 8, 30, 12, 60]])
MASK = (np.arange(7) >= np.array([[0], [3]])).astype(np.int64)  # the second row left-padded

pytestmark = pytest.mark.slow  # exports and onnxruntime sessions: seconds each


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decoder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"chunked-{request.param}")
    model = make_hf_decoder(root / "base", request.param, num_hidden_layers=3)
    make_peft_adapter(copy.deepcopy(model), root / "adapter", request.param)
    return root


@pytest.mark.parametrize(
    "extra", [(), ("--quantize", "int4", "--keep-adapter")], ids=["float32", "int4-kept"]
)
def test_chunks_give_the_whole_graphs_numbers(decoder, tmp_path, extra):
    out = tmp_path / "out"
    ok(
        run(
            "export",
            "--model",
            decoder / "base",
            "--adapter",
            decoder / "adapter",
            "--out",
            out,
            "--stream",
            *extra,
        )
    )
    meta = json.loads((out / "loraexport.json").read_text())
    assert is_fused(meta)
    whole = OnnxModel(out)
    want, want_tokens = whole.forward_all(IDS, MASK)["model.logits"], whole.generate(IDS, MASK, 6)
    for budget, chunks in ((1, 3), (None, None)):  # a layer per chunk; the default plan
        with ChunkedDecoder(out, meta, budget=budget) as model:
            assert chunks is None or model.chunks == chunks
            got = model.forward_all(IDS, MASK)
            assert np.array_equal(got[MASK.astype(bool)], want[MASK.astype(bool)])  # the same kernels: exact
            assert np.array_equal(model.generate(IDS, MASK, 6), want_tokens)
        assert not list(tmp_path.glob(".loraexport-chunks-*"))  # the scratch folder is gone


def test_a_chunk_holds_its_layers_and_nothing_else(decoder, tmp_path):
    out = tmp_path / "out"
    ok(run("export", "--model", decoder / "base", "--out", out, "--stream"))
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert _plan(proto, 3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert _plan(proto, 3, 10**12) == [(0, 3)]
    middle = cut(proto, 1, 2, 3)
    names = {t.name for t in middle.graph.initializer}
    assert any(n.startswith("layers.1.") for n in names)
    # layer 1 ends with the next layer's input norm (its weight is named for layer 2)
    others = [n for n in names if n.startswith(("layers.0.", "layers.2.", "embed_tokens", "lm_head"))]
    assert others == ["layers.2.input_norm.weight"]
    inputs = {i.name for i in middle.graph.input}
    assert {"layers.1.input_norm.out", "layers.1.input_norm.residual", "past_key_values.1.key"} <= inputs
    assert "past_key_values.0.key" not in inputs
    outputs = [o.name for o in middle.graph.output]
    assert outputs[:2] == ["layers.2.input_norm.out", "layers.2.input_norm.residual"]
