"""Honest quantized exports still pass, each through ``merge-and-export`` (which verifies what it
wrote, before ``loraexport.json`` exists) and then ``verify`` of the folder on disk (files first,
then the proof, parity against the dequantized reference, quality): the proof cannot reject
everything. Tiny Llama, Qwen2 (tied embeddings), Mistral and GPT-2, each int8, int4,
int4 --keep-adapter and int8-dynamic; adapter mode with two adapters; --stream."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from clihelp import QUICK, ok, run
from hf_tiny import save_base_and_adapter

from loraexport.stages.extras import EXTRAS  # the config and tokenizer files' proof

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VARIANTS = {
    "int8": ("--quantize", "int8"),
    "int4": ("--quantize", "int4"),
    "int4-keep": ("--quantize", "int4", "--keep-adapter"),
    "int8-dynamic": ("--quantize", "int8-dynamic"),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return request.param, *save_base_and_adapter(request.param, tmp_path_factory.mktemp(request.param))


def _checked(out, verified) -> dict:
    """Both reports pass, each with its proof and its parity against the dequantized reference."""
    for report in (json.loads((out / "report.json").read_text()), verified):
        assert report["passed"] is True, report["proof"]["failures"] + report["parity"]["failures"]
        assert report["proof"]["passed"] and report["proof"]["quantized_tensors"] > 0
        assert report["proof"]["modules"] >= report["proof"]["quantized_tensors"]
        assert report["parity"]["passed"] and report["parity"]["top1_agreement"] == 1.0
    assert verified["manifest"]["checked"] >= 3 and verified["manifest"]["description"] == "ok"
    return verified


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_honest_quantized_export_passes(family, variant, tmp_path):
    name, base, adapter = family
    out = tmp_path / "out"
    # --optimize: the graphs people ship (the fused graph; GPT-2's last-position one)
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, "--optimize",
           *VARIANTS[variant], *QUICK))  # fmt: skip
    r = ok(run("verify", "--base", base, "--adapter", adapter, "--onnx", out, *QUICK, "--json"))
    verified = _checked(out, json.loads(r.stdout))
    if name == "qwen2":  # tied: int8/int4 gather the embedding from the LM head's codes (one tensor, two
        # modules); quantize_dynamic and --keep-adapter leave the embedding float
        assert verified["proof"]["modules"] == 2 * 7 + (1 if variant in ("int8-dynamic", "int4-keep") else 2)


@pytest.mark.parametrize(
    "name, variant",
    [
        ("llama", "int4"),
        ("llama", "int8-dynamic"),
        ("qwen2", "int8"),
        ("gpt2", "int4"),
        ("gpt2", "int8-dynamic"),
    ],
)  # Linear and Conv1D layers; Qwen2's biases and tied LM head
def test_the_torch_onnx_graph_is_proven_too(name, variant, tmp_path):
    """--no-stream: tensors carry the exporter's names. int8/int4 are proven from the file's
    node and tensor names (``verify.scoped``); int8-dynamic by exporting the reference again."""
    base, adapter = save_base_and_adapter(name, tmp_path / "in")
    out = tmp_path / "out"
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, "--no-stream",
           *VARIANTS[variant], *QUICK))  # fmt: skip
    r = ok(run("verify", "--base", base, "--adapter", adapter, "--onnx", out, *QUICK, "--json"))
    method = _checked(out, json.loads(r.stdout))["proof"]["method"]
    scoped = method.startswith("the file's float graph rebuilt from its node")
    assert scoped is (variant != "int8-dynamic"), method


def test_an_encoder_and_the_encoder_decoder(seq2seq_base, seq2seq_adapter, tmp_path):
    """BERT (torchscript, no logits: its hidden states) int8 with the adapter kept, and the
    reference encoder-decoder (dynamo: two graph files) int4: proven and passing."""
    base, adapter = save_base_and_adapter("bert", tmp_path / "bert")
    for (b, a), options in (
        ((base, adapter), ("--quantize", "int8", "--keep-adapter")),
        ((seq2seq_base, seq2seq_adapter), ("--quantize", "int4")),
    ):
        out = tmp_path / f"out-{options[1]}"
        ok(run("merge-and-export", "--base", b, "--adapter", a, "--out", out, *options, *QUICK))
        r = ok(run("verify", "--base", b, "--adapter", a, "--onnx", out, *QUICK, "--json"))
        report = json.loads(r.stdout)
        assert report["proof"]["passed"] and report["parity"]["passed"], report["proof"]["failures"]
        graphs = {"model.onnx", "encoder.onnx", "decoder.onnx"}
        assert {f["file"] for f in report["proof"]["files"]} <= graphs | {EXTRAS}


def test_adapter_mode_with_two_adapters(tmp_path):
    base, adapter = save_base_and_adapter("llama", tmp_path / "one")
    _, other = save_base_and_adapter("llama", tmp_path / "two", seed=5)
    out = tmp_path / "out"
    adapters = ("--adapter", adapter, "--adapter", other)
    ok(run("merge-and-export", "--base", base, *adapters, "--mode", "adapter", "--quantize", "int8",
           "--out", out, *QUICK))  # fmt: skip
    r = ok(run("verify", "--base", base, *adapters, "--onnx", out, *QUICK, "--json"))
    report = json.loads(r.stdout)
    files = {f["file"] for f in report["proof"]["files"]}
    assert (
        files == {"model.onnx", "adapter.onnx_adapter", "adapter-2.onnx_adapter", EXTRAS}
        and report["proof"]["passed"]
    )
    assert len(report["parity_by_provider"]) == 3  # each adapter, and none, against the dequantized base


@pytest.mark.parametrize("keep", [False, True], ids=["merged", "keep"])
def test_streamed_int4(tmp_path, keep):
    base, adapter = save_base_and_adapter("qwen2", tmp_path / "in")
    out = tmp_path / "out"
    keep_flag = ("--keep-adapter",) * keep
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, "--stream", "--quantize",
           "int4", *keep_flag, *QUICK))  # fmt: skip
    for stream in ("--stream", "--no-stream"):  # the streamed proof, and the in-memory one, agree
        r = ok(run("verify", "--base", base, "--adapter", adapter, "--onnx", out, stream, *QUICK, "--json"))
        _checked(out, json.loads(r.stdout))
    shutil.rmtree(out)


@pytest.mark.parametrize(
    "options",
    [
        ("--quantize", "int4", "--block-size", "32"),
        ("--quantize", "int8", "--block-size", "64", "--no-stream"),
        ("--quantize", "int4", "--block-size", "32", "--keep-adapter", "--no-stream"),
        ("--optimize", "--quantize", "int8", "--block-size", "128", "--no-stream"),
    ],
    ids=["fused-streamed", "torch.onnx", "keep-adapter", "fused-in-memory"],
)
def test_a_chosen_block_size_is_written_recorded_and_proven(options, tmp_path):
    """--block-size: every MatMulNBits of the file has it, loraexport.json records it, and verify
    proves the file with it (each proof path: written again, from the names, exported again)."""
    base, adapter = save_base_and_adapter("llama", tmp_path / "in")
    out = tmp_path / "out"
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, *options, *QUICK))
    r = ok(run("verify", "--base", base, "--adapter", adapter, "--onnx", out, *QUICK, "--json"))
    _checked(out, json.loads(r.stdout))
    block = int(options[options.index("--block-size") + 1])
    q = json.loads((out / "loraexport.json").read_text())["quantization"]
    assert q["block_size"] == block and f"blocks of {block}," in q["method"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    sizes = {
        a.i
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "block_size"
    }
    assert sizes == {block}
