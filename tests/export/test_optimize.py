"""``--optimize``: graphs that compute the last position's logits (GPT-2; Llama and Qwen2 fused,
with the cache updated in place) pass the same verification as plain exports, which compares
every position (``OnnxModel.forward_all`` teacher-forces them through the cache), and a wrong
weight in such a graph still fails it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from artifacts import make_hf_decoder, make_peft_adapter
from clihelp import refused, run
from onnx import numpy_helper

from loraexport.errors import VerificationFailedError
from loraexport.pipeline import merge_and_export
from loraexport.runtime.model import OnnxModel, RuntimeInputError
from loraexport.stages.export import export
from loraexport.stages.verify import verify

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow
LAYOUTS = {"gpt2": "growing", "llama": "shared-buffer", "qwen2": "shared-buffer"}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def optimized(request, tmp_path_factory):
    """(kind, base dir, adapter dir, optimized export, plain export, report) of one family."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"opt-{kind}")
    model = make_hf_decoder(tmp / "base", kind, **({"hidden_size": 64} if kind != "gpt2" else {}))
    make_peft_adapter(model, tmp / "adapter", kind)
    report = merge_and_export(
        tmp / "base", tmp / "adapter", tmp / "opt", optimize=True, stream=False, latency=False
    )
    merge_and_export(tmp / "base", tmp / "adapter", tmp / "plain", stream=False, verify_output=False)
    return kind, tmp / "base", tmp / "adapter", tmp / "opt", tmp / "plain", report


def test_optimized_export_passes_parity_at_every_position(optimized):
    kind, _, _, out, _, report = optimized
    assert report.passed, report.failures
    (parity,) = report.parity
    # every case compares every valid position's logits (teacher-forced through the cache)
    assert all(
        o.top1_agreement == 1.0 for c in parity.cases for o in c.outputs if o.output.endswith("logits")
    )
    assert parity.generation.identical_rows == parity.generation.rows > 0
    meta = json.loads((out / "loraexport.json").read_text())
    assert meta["graphs"]["model"]["logits"] == "last"
    assert meta["graphs"]["model"]["kv_cache"] == LAYOUTS[kind]
    assert meta["optimize"]["graph"]
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is (LAYOUTS[kind] == "shared-buffer")


def test_logits_axis_is_the_static_one(optimized):
    """onnxruntime-genai treats logits as last-position only when the declared axis is 1."""
    _, _, _, out, _, _ = optimized
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    logits = next(o for o in graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1


def test_prompt_pass_equals_the_plain_exports_last_position(optimized):
    """One forward pass (what latency times) gives (B, 1, V): the plain export's last column.
    Tolerance: two float32 graphs of O(1) logits computed in different orders (fused kernels,
    packed products) differ by a few roundings; 1e-4 is far below a wrong weight's effect."""
    _, _, _, out, plain, _ = optimized
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding, as generation uses it
    got = OnnxModel(out).forward(ids, mask)
    want = OnnxModel(plain).forward(ids, mask)[:, -1:]
    assert got.shape == (2, 1, 96)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_generation_matches_the_plain_export(optimized):
    _, _, _, out, plain, _ = optimized
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 96, size=(3, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    got = OnnxModel(out).generate(ids, mask, 12)
    want = OnnxModel(plain).generate(ids, mask, 12)
    np.testing.assert_array_equal(got, want)


def test_a_wrong_weight_in_an_optimized_graph_fails_verification(optimized, tmp_path):
    """The stepwise comparison can fail: one weight of the graph scaled by 1.01."""
    kind, base, adapter, out, _, _ = optimized
    broken = tmp_path / "broken"
    model = onnx.load(str(out / "model.onnx"))
    big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    value = numpy_helper.to_array(big) * np.float32(1.01)
    big.CopyFrom(numpy_helper.from_array(value, big.name))
    broken.mkdir()
    for f in out.iterdir():
        if f.name != "model.onnx":
            (broken / f.name).write_bytes(f.read_bytes())
    onnx.save(model, str(broken / "model.onnx"))
    with pytest.raises(VerificationFailedError):
        verify(base, adapter, broken, latency=False)


def test_optimize_is_refused_where_it_does_not_apply(causal_base, causal_adapter, tmp_path):
    r = run(
        "export", "--model", causal_base, "--adapter", causal_adapter, "--out", tmp_path / "o", "--optimize"
    )
    refused(r, 3, "--optimize applies to Hugging Face decoders")  # input it does not apply to
    assert not (tmp_path / "o").exists()


def test_int4_keeps_the_same_matmuls_in_8_bits_packed_or_not(tmp_path):
    """int4's 8-bit MatMuls (the MLP's down projections, the LM head) are the same whether q/k/v
    are packed (a base or merged graph) or not (an unmerged one): the base quantized "the same
    way" for ``adapter_retained`` must be."""
    from loraexport.export.quantize import _wide_matmuls

    model = make_hf_decoder(tmp_path / "base", "llama", hidden_size=64, intermediate_size=128)
    make_peft_adapter(model, tmp_path / "adapter", "llama")
    export(tmp_path / "base", tmp_path / "packed", optimize=True)
    export(
        tmp_path / "base", tmp_path / "unpacked", adapter=tmp_path / "adapter", mode="unmerged", optimize=True
    )
    chosen = []
    for d in ("packed", "unpacked"):
        graph = onnx.load(str(tmp_path / d / "model.onnx"))
        lora = {n.name for n in graph.graph.node if ".lora." in n.name}
        wide, _ = _wide_matmuls(graph, lora)
        chosen.append(sorted(wide))
    assert chosen[0] == chosen[1]
    assert len(chosen[0]) == 2 + 1  # 2 layers' down projections and the LM head


def test_a_description_that_claims_a_fused_graph_is_refused(optimized, tmp_path):
    """loraexport.json is untrusted: a plain graph described as a shared-buffer one is refused
    in one line (the graph's logits are not the declared last position), not run wrongly."""
    _, _, _, _, plain, _ = optimized
    lying = tmp_path / "lying"
    shutil.copytree(plain, lying)
    meta = json.loads((lying / "loraexport.json").read_text())
    meta["graphs"]["model"] |= {"logits": "last", "kv_cache": "shared-buffer"}
    (lying / "loraexport.json").write_text(json.dumps(meta))
    ids = np.array([[5, 6, 7]])
    with pytest.raises(RuntimeInputError) as e:
        OnnxModel(lying).generate(ids, np.ones_like(ids), 2)
    assert "\n" not in str(e.value) and "logits" in str(e.value)


def test_no_new_tokens_is_an_empty_answer(optimized):
    """max_new_tokens 0 gives (batch, 0) ids from either cache layout; below 0 is refused (issue 26:
    it used to be an empty answer too)."""
    _, _, _, out, plain, _ = optimized
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    for d in (out, plain):
        assert OnnxModel(d).generate(ids, np.ones_like(ids), 0).shape == (2, 0)
        with pytest.raises(RuntimeInputError, match="max_new_tokens must be 0 or more"):
            OnnxModel(d).generate(ids, np.ones_like(ids), -1)


def test_a_config_the_fused_graph_cannot_express_is_refused_before_work(tmp_path):
    """RoPE scaling (or a sliding window, or another activation) is read from config.json: exit 3
    in one line naming it, before the weights are read, and nothing written."""
    model = make_hf_decoder(
        tmp_path / "base", "llama", hidden_size=64, rope_scaling={"rope_type": "linear", "factor": 2.0}
    )
    make_peft_adapter(model, tmp_path / "adapter", "llama")
    (tmp_path / "base" / "model.safetensors").write_bytes(b"not read")  # proof: no weight is read
    for command in ("export", "merge-and-export"):
        source = "--model" if command == "export" else "--base"
        r = run(
            command,
            source,
            tmp_path / "base",
            "--adapter",
            tmp_path / "adapter",
            "--out",
            tmp_path / "o",
            "--optimize",
        )
        refused(r, 3, "config.json", "rope_type is 'linear'")
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("n", [10**12, 200, 2.0, True])
def test_more_tokens_than_the_model_holds_are_refused_before_any_buffer(optimized, n):
    """The shared buffer is allocated for prompt + new tokens: 10^12 of them (or a count past
    context_length 128, or not an integer) is one RuntimeInputError line, not a huge allocation."""
    _, _, _, out, plain, _ = optimized
    ids = np.array([[5, 6, 7]])
    for d in (out, plain):
        with pytest.raises(RuntimeInputError) as e:
            OnnxModel(d).generate(ids, np.ones_like(ids), n)
        assert "\n" not in str(e.value)


def test_quantized_figures_see_prompt_passes(optimized, monkeypatch):
    """``verify.quantized.prompt_logits`` gives each position of a last-position graph the
    logits of a prompt pass ending there: the plain export's logits at every position (an
    int8-dynamic graph quantizes a prompt's activations with one scale, so stepping one token
    at a time would measure another thing). Capped positions are left out, not faked.
    Tolerance: as the test above, two float32 graphs computed in different orders."""
    from loraexport.verify import quantized

    _, _, _, out, plain, _ = optimized
    ids = np.random.default_rng(2).integers(3, 96, size=(2, 9))
    args = (ids, np.ones_like(ids), None)
    fused, want = OnnxModel(out), OnnxModel(plain).forward(ids, np.ones_like(ids))
    np.testing.assert_allclose(quantized.prompt_logits(fused, args), want, atol=1e-4)
    monkeypatch.setattr(quantized, "MAX_PREFIX_PASSES", 4)
    checked = quantized._checked(fused, ids.shape)
    assert checked.sum(axis=1).tolist() == [4, 4] and checked[:, [0, -1]].all()
    got = quantized.prompt_logits(fused, args)
    np.testing.assert_allclose(got[checked], want[checked], atol=1e-4)
    assert not got[~checked].any()
