"""A float32 export is proven tensor by tensor too, not only judged by parity: parity reads the
positions, ids and token types its cases feed (lengths up to 64, random ids, token type 0), so a
weight row, an attribute or a claim that acts only elsewhere passed it. Each wrong file here
passed ``verify`` before the float proof (exit 0, or 1 for a dropped output) and exits 4 now,
through the real CLI, after ``loraexport.json`` was rewritten to agree with the changed files
(``tamper.restamp``). Honest exports still pass, with their proof in the report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from clihelp import QUICK, ok, refused, run
from hf_tiny import save_base_and_adapter
from tamper import edit_meta, names, planted, restamp

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

PAST_THE_CASES = 100  # a position the parity cases never reach (their longest is 64; 128 positions)


@pytest.fixture(scope="module", params=["llama", "bert", "gpt2"])
def family(request, tmp_path_factory):
    return request.param, save_base_and_adapter(request.param, tmp_path_factory.mktemp(request.param))


def _export(inputs, out, *options) -> dict:
    base, adapter = inputs
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, *QUICK, *options))
    return json.loads((out / "report.json").read_text())


def _verify(inputs, onnx_dir):
    base, adapter = inputs
    return run("verify", "--base", base, "--adapter", adapter, "--onnx", onnx_dir, *QUICK, "--json")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    inputs = save_base_and_adapter("llama", tmp_path_factory.mktemp("llama"))
    out = tmp_path_factory.mktemp("fused") / "out"
    _export(inputs, out)  # written from the checkpoint: loraexport's fused graph
    return inputs, out


def _planted(src, tmp_path, change, graph="model.onnx"):
    return planted(src, tmp_path / "planted", change, graph)


def _rows(pattern: str, rows, factor: float):
    def change(arrays):
        for n in names(arrays, pattern):
            arrays[n] = arrays[n].copy()
            arrays[n][rows] *= np.float32(factor)

    return change


def _wrong(r, *needles: str) -> str:
    return refused(r, 4, *needles, printed=True)


def test_an_honest_float32_export_is_proven(family, tmp_path):
    """``verify`` proves every float32 export: loraexport's fused graph written again, a torch.onnx
    graph exported again; ``merge-and-export`` proves the fused graph, not a torch.onnx graph it
    has just exported from the very same reference (parity judges it, as before)."""
    name, inputs = family
    report = _export(inputs, tmp_path / "out")
    fused = json.loads((tmp_path / "out" / "loraexport.json").read_text())["exporter"] == "loraexport"
    assert fused is (name == "llama")
    if fused:
        assert report["proof"]["passed"] and report["proof"]["tensors"] > 0
    else:
        assert report["proof"] is None
    verified = json.loads(ok(_verify(inputs, tmp_path / "out")).stdout)
    proof = verified["proof"]
    assert verified["passed"] and proof["passed"] and proof["quantized_tensors"] == 0
    assert proof["tensors"] >= 10 and proof["method"].startswith(
        "the fused graph written again" if fused else "the reference exported again"
    )


def test_rotary_rows_past_the_cases_scaled(llama, tmp_path):
    inputs, out = llama
    planted = _planted(out, tmp_path, _rows(r"^rotary\.(cos|sin)", slice(PAST_THE_CASES, None), 1.1))
    _wrong(_verify(inputs, planted), "rotary.cos")


def test_embedding_rows_of_ids_parity_never_draws(llama, tmp_path):
    """The begin-of-sequence row alone (random ids rarely draw one row; generation never does)."""
    inputs, out = llama
    planted = _planted(out, tmp_path, _rows(r"embed_tokens", [1], 1.5))
    _wrong(_verify(inputs, planted), "embed_tokens")


@pytest.mark.parametrize("attribute, value", [("local_window_size", 70), ("softcap", 1000.0)])
def test_an_attention_attribute_that_acts_past_the_cases(llama, tmp_path, attribute, value):
    inputs, out = llama
    planted = tmp_path / "planted"
    shutil.copytree(out, planted)
    model = onnx.load(str(planted / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            kept = [a for a in node.attribute if a.name != attribute]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute(attribute, value)])
    onnx.save(model, str(planted / "model.onnx"))
    restamp(planted)
    _wrong(_verify(inputs, planted), attribute)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["model"].update(eos_token_ids=[5]),  # generation would stop at 5 on both sides
        lambda m: m["model"].update(context_length=16),  # was exit 3, a run refusing its own inputs
    ],
    ids=["eos", "context"],
)
def test_a_false_claim_about_the_model(llama, tmp_path, change):
    inputs, out = llama
    planted = tmp_path / "planted"
    shutil.copytree(out, planted)
    edit_meta(planted, change)
    _wrong(_verify(inputs, planted), "'model'")


def test_torch_onnx_graphs_are_proven_by_exporting_again(family, tmp_path):
    """A row past the cases' positions (GPT-2's and BERT's position tables, the Llama graph's
    rotary table as torch.onnx writes it is computed, so its embedding row of BOS) and, for BERT,
    the token type parity never feeds."""
    name, inputs = family
    out = tmp_path / "out"
    _export(inputs, out, "--no-stream")
    pattern, rows = {
        "llama": (r"embed_tokens", [1]),
        "bert": (r"token_type_embeddings", [1]),
        "gpt2": (r"wpe", slice(PAST_THE_CASES, None)),
    }[name]
    planted = _planted(out, tmp_path, _rows(pattern, rows, 1.5))
    _wrong(_verify(inputs, planted), pattern)


def test_a_dropped_graph_output_is_a_failed_proof_not_an_internal_error(llama, tmp_path):
    inputs, _ = llama
    out = tmp_path / "out"
    _export(inputs, out, "--no-stream")
    model = onnx.load(str(out / "model.onnx"))
    kept = [o for o in model.graph.output if o.name != "present.1.value"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(out / "model.onnx"))
    restamp(out)
    _wrong(_verify(inputs, out), "graph output", "present.1.value")


def test_a_torch_onnx_weight_that_differs_is_named_by_its_module(tmp_path):
    """torch.onnx names a linear layer's weight as it likes (``val_55``, ``onnx::MatMul_668``):
    the proof names the module that holds it, as it does for a quantized weight."""
    inputs = save_base_and_adapter("llama", tmp_path / "in")
    out = tmp_path / "out"
    _export(inputs, out, "--no-stream")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    q = "model.layers.1.self_attn.q_proj"  # merged with the adapter: no other layer holds its values
    assert not any(q in t.name for t in model.graph.initializer)  # the exporter's own names

    def change(arrays):  # q_proj's weight, found by value (transposed, as MatMul reads it)
        from loraexport.stages.inputs import load_inputs
        from loraexport.stages.merge import merged_model

        loaded = load_inputs(inputs[0], [inputs[1]], False, None)
        merged, _ = merged_model(loaded.base, loaded.adapters)
        want = merged.get_submodule(q).weight.detach().numpy().T
        (name,) = [n for n, a in arrays.items() if a.shape == want.shape and np.array_equal(a, want)]
        arrays[name] = arrays[name] * np.float32(1.01)

    planted = _planted(out, tmp_path, change)
    _wrong(_verify(inputs, planted), q)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_file_is_proven_against_its_rounded_weights(tmp_path, dtype):
    """The fused graph (verify holds it in memory: --no-stream) and the torch.onnx one: honest,
    each proven; a rotary row past the cases scaled in the fused one, exit 4."""
    base, adapter = save_base_and_adapter("llama", tmp_path / "in")
    check = ("verify", "--base", base, "--adapter", adapter, "--no-stream", *QUICK, "--onnx")
    export = ("export", "--model", base, "--adapter", adapter, "--dtype", dtype, "--out")
    for name, how in (("fused", "--optimize"), ("torch-onnx", "--no-stream")):
        ok(run(*export, tmp_path / name, how))
        proof = json.loads(ok(run(*check, tmp_path / name, "--json")).stdout)["proof"]
        assert proof["passed"] and proof["tensors"] > 0, proof
    rows = _rows(r"^rotary\.(cos|sin)", slice(PAST_THE_CASES, None), 1.1)
    _wrong(run(*check, _planted(tmp_path / "fused", tmp_path, rows)), "rotary.cos")
