"""The fused decoder graph (``loraexport.export.fused``: GroupQueryAttention, RotaryEmbedding,
skip RMSNorms, last-position logits) computes what the Hugging Face model computes, through a
prompt pass, a shared KV buffer (``loraexport.runtime.fused``) and a growing cache alike, with
LoRA branches kept unmerged and byte-exact."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from loraexport.errors import ExportError
from loraexport.export import fused
from loraexport.export.fused import build_fused_decoder
from loraexport.lora.layer import LoRALinear, WeightedLoRALinear
from loraexport.runtime.fused import forward_stepwise, generate_shared
from loraexport.runtime.model import positions, session_options

transformers = pytest.importorskip("transformers")

# float32 on both sides, the same operations in another summation order (MLAS vs torch GEMMs,
# fused RMSNorm/softmax kernels): float32 rounding (eps 1.2e-7) on logits of O(1) magnitude (std
# ≈ 1.5, up to ~6, with the initializer range below), grown through 2 layers: a few dozen ulp.
# Measured max over all families, paddings and the LoRA model: 6.1e-6 on logits, 4.1e-6 on
# caches. 1e-4 leaves 16x headroom; a 0.1% change to the attention scale or to a LoRA
# coefficient already exceeds it, a wrong position or mask column by far.
ATOL = 1e-4
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
CACHE = (LAYERS, KV_HEADS, HEAD_DIM)
NEW_TOKENS = 16
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    vocab_size=96,  # not 128, so no weight shares the packed q|k|v shape (64, 128)
    max_position_embeddings=64,
    initializer_range=0.2,  # peaked attention and O(1) logits: positions and masks matter
    bos_token_id=1,
    eos_token_id=None,  # generation runs its full length on both sides
    pad_token_id=0,
)
FAMILIES = {
    "llama": lambda **kw: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, **kw)),
    "mistral": lambda **kw: transformers.MistralForCausalLM(
        transformers.MistralConfig(**{"sliding_window": None, **SMALL, **kw})
    ),
    "qwen2": lambda **kw: transformers.Qwen2ForCausalLM(  # q/k/v biases; tied embeddings
        transformers.Qwen2Config(**{"tie_word_embeddings": True, **SMALL, **kw})
    ),
}
PROMPT_LEN = 9


def _model(family: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    return FAMILIES[family](**config).eval()


def _session(path) -> ort.InferenceSession:
    so = session_options(2)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _export(model, tmp_path) -> tuple[ort.InferenceSession, dict]:
    info = build_fused_decoder(model, tmp_path / "model.onnx")
    return _session(tmp_path / "model.onnx"), info


def _batch(padding: str, batch: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random ids (pad id 0 where masked) and a mask with rows of different lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, SMALL["vocab_size"], (batch, PROMPT_LEN))
    mask = np.ones((batch, PROMPT_LEN), np.int64)
    for row in range(1, batch):  # row 0 is full length
        cut = 2 * row + 1
        if padding == "left":
            mask[row, :cut] = 0
        elif padding == "right":
            mask[row, PROMPT_LEN - cut :] = 0
    return np.where(mask == 1, ids, 0).astype(np.int64), mask


def _hf(model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HF logits (B, T, V) and caches (B, KV, T, D), with the runtime's position ids."""
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions(mask)),
            use_cache=True,
        )
    cache = getattr(out, "cache", None) or out.past_key_values
    presents = {}
    for i, layer in enumerate(cache.layers):
        presents[f"present.{i}.key"] = layer.keys.numpy()
        presents[f"present.{i}.value"] = layer.values.numpy()
    return out.logits.numpy(), presents


def _empty_past(batch: int) -> dict[str, np.ndarray]:
    z = np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32)
    return {f"past_key_values.{i}.{k}": z for i in range(LAYERS) for k in ("key", "value")}


def _run(session, ids, mask, pos, past) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _cache_error(ours: dict, ref: dict, mask: np.ndarray) -> float:
    """Largest cache difference over the unmasked positions (padding rows differ legitimately:
    HF's fully masked pad queries give other values to the next layer)."""
    keep = mask.astype(bool)
    return max(
        float(np.abs(ours[n][:, :, : mask.shape[1]] - ref[n]).transpose(0, 2, 1, 3)[keep].max()) for n in ref
    )


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_pass_matches_hf(family, padding, tmp_path):
    model = _model(family)
    session, info = _export(model, tmp_path)
    assert info["layout"] == "fused" and info["attention"] == "GroupQueryAttention"
    assert info["nodes_per_layer"] == (15 if family == "qwen2" else 14)  # Qwen2: + Add(q|k|v bias)
    assert info["packed_qkv_layers"] == info["packed_mlp_layers"] == LAYERS
    logits_shape = next(o.shape for o in session.get_outputs() if o.name == "logits")
    assert logits_shape == ["batch", 1, SMALL["vocab_size"]]  # static 1: genai's "pruned" test
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=False)  # as the export stage does
    ids, mask = _batch(padding)
    out = _run(session, ids, mask, positions(mask), _empty_past(len(ids)))
    ref_logits, ref_cache = _hf(model, ids, mask)
    assert out["logits"].shape == (3, 1, SMALL["vocab_size"])
    np.testing.assert_allclose(out["logits"][:, 0], ref_logits[:, -1], rtol=0, atol=ATOL)
    assert _cache_error(out, ref_cache, mask) <= ATOL
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_shared_matches_hf_generate(family, tmp_path):
    model = _model(family)
    session, _ = _export(model, tmp_path)
    for ids, mask in (_batch("left", batch=2), _batch("none", batch=1)):
        ours = generate_shared(session, ids, mask, NEW_TOKENS, CACHE)
        with torch.no_grad():
            ref = model.generate(
                torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        np.testing.assert_array_equal(ours, ref[:, PROMPT_LEN:].numpy())


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_stepwise_matches_full_forward(family, padding, tmp_path):
    model = _model(family)
    session, _ = _export(model, tmp_path)
    ids, mask = _batch(padding)
    out = forward_stepwise(session, ids, mask, CACHE)
    ref_logits, ref_cache = _hf(model, ids, mask)
    keep = mask.astype(bool)
    assert np.abs(out["logits"] - ref_logits)[keep].max() <= ATOL
    assert _cache_error(out, ref_cache, mask) <= ATOL
    assert all(np.isfinite(v).all() for v in out.values())  # padded positions too


def test_growing_cache_equals_shared_buffer(tmp_path):
    """Plain ``session.run`` with a past of length P: a 5-token prompt, then one token per call."""
    model = _model("llama")
    session, _ = _export(model, tmp_path)
    ids, mask = _batch("left")
    shared = forward_stepwise(session, ids, mask, CACHE)
    pos, first = positions(mask), 5
    out = _run(session, ids[:, :first], mask[:, :first], pos[:, :first], _empty_past(len(ids)))
    for t in range(first, PROMPT_LEN):
        past = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k != "logits"}
        assert past["past_key_values.0.key"].shape[2] == t
        out = _run(session, ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1], past)
        np.testing.assert_allclose(out["logits"][:, 0], shared["logits"][:, t], rtol=0, atol=ATOL)
    assert _cache_error(out, {k: v for k, v in shared.items() if k != "logits"}, mask) <= ATOL


def test_growing_cache_chunk_after_past_batch_one(tmp_path):
    """Several new tokens after a past: supported for batch 1 (onnxruntime refuses batch > 1)."""
    model = _model("qwen2")
    session, _ = _export(model, tmp_path)
    ids, mask = _batch("none", batch=1)
    pos = positions(mask)
    out = _run(session, ids[:, :4], mask[:, :4], pos[:, :4], _empty_past(1))
    past = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k != "logits"}
    out = _run(session, ids[:, 4:], mask, pos[:, 4:], past)
    ref_logits, ref_cache = _hf(model, ids, mask)
    np.testing.assert_allclose(out["logits"][:, 0], ref_logits[:, -1], rtol=0, atol=ATOL)
    assert _cache_error(out, ref_cache, mask) <= ATOL


def _add_lora(model) -> list[np.ndarray]:
    """q_proj/v_proj as LoRALinear with nonzero B; layer 0's down_proj and the LM head with two
    weighted branches. Returns every A and B, as the adapter holds them."""
    g = torch.Generator().manual_seed(2)
    adapters = []
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            wrapped = LoRALinear(getattr(layer.self_attn, name), r=4, scaling=2.0)
            with torch.no_grad():
                wrapped.lora_B.copy_(torch.randn(wrapped.lora_B.shape, generator=g) * 0.3)
            setattr(layer.self_attn, name, wrapped)
            adapters += [wrapped.lora_A, wrapped.lora_B]
    for owner, name in ((model.model.layers[0].mlp, "down_proj"), (model, "lm_head")):
        base = getattr(owner, name)
        shapes = [
            ((2, base.in_features), (base.out_features, 2), 0.75),
            ((3, base.in_features), (base.out_features, 3), -1.5),
        ]
        branches = [
            (torch.randn(a, generator=g) * 0.1, torch.randn(b, generator=g) * 0.1, c) for a, b, c in shapes
        ]
        setattr(owner, name, WeightedLoRALinear(base, branches))
        adapters += [t for a, b, _ in branches for t in (a, b)]
    return [t.detach().numpy() for t in adapters]


def test_lora_branches_unmerged_and_exact(tmp_path):
    model = _model("llama")
    ids, mask = _batch("left")
    base_logits, _ = _hf(model, ids, mask)
    adapters = _add_lora(model)
    session, info = _export(model, tmp_path)
    assert info["lora_branches"] == 2 * LAYERS + 4
    assert info["packed_qkv_layers"] == 0 and info["packed_mlp_layers"] == LAYERS  # MLP has no branch

    ref_logits, ref_cache = _hf(model, ids, mask)
    out = forward_stepwise(session, ids, mask, CACHE)
    keep = mask.astype(bool)
    assert np.abs(out["logits"] - ref_logits)[keep].max() <= ATOL
    assert _cache_error(out, ref_cache, mask) <= ATOL
    assert np.abs(ref_logits - base_logits)[keep].max() > 1e-2  # the branches changed the output

    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    stored = {hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest() for t in graph.initializer}
    for tensor in adapters:  # Aᵀ and Bᵀ as initializers, exactly the adapter's values
        assert hashlib.sha256(np.ascontiguousarray(tensor.T).tobytes()).hexdigest() in stored
    shapes = [tuple(t.dims) for t in graph.initializer]
    hidden, inter = SMALL["hidden_size"], SMALL["intermediate_size"]
    assert shapes.count((hidden, 4 * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM)) == 0  # no packed q|k|v
    assert shapes.count((hidden, 2 * inter)) == LAYERS  # gate|up still packed
    assert shapes.count((hidden, KV_HEADS * HEAD_DIM)) == 2 * LAYERS  # k_proj and v_proj, apart


@pytest.mark.parametrize(
    "family, config, change, message",
    [
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None, "rope_type is 'linear'"),
        ("mistral", {"sliding_window": 16}, None, "sliding_window 16"),
        ("llama", {"hidden_act": "gelu"}, None, "not silu"),
        ("llama", {}, lambda m: setattr(m.model.layers[1].mlp, "up_proj", torch.nn.Identity()), "Identity"),
        ("llama", {}, lambda m: m.to(torch.float16), "float32"),
        ("qwen2", {}, lambda m: setattr(m, "lm_head", torch.nn.Linear(64, 96, bias=False)), "tie_word"),
    ],
)
def test_unsupported_models_raise_export_error(family, config, change, message, tmp_path):
    model = _model(family, **config)
    if change is not None:
        change(model)
    with pytest.raises(ExportError, match=message):
        build_fused_decoder(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_large_weights_go_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(fused, "EXTERNAL_DATA_BYTES", 0)
    model = _model("llama")
    session, info = _export(model, tmp_path)
    assert info["external_data"] and (tmp_path / "model.onnx.data").is_file()
    ids, mask = _batch("left")
    out = forward_stepwise(session, ids, mask, CACHE)
    assert np.abs(out["logits"] - _hf(model, ids, mask)[0])[mask.astype(bool)].max() <= ATOL


def test_decode_step_latency_report(tmp_path):
    """Not asserted: per-step decode time through the shared buffer (run with -s to see it)."""
    session, _ = _export(_model("llama"), tmp_path)
    ids, mask = _batch("none", batch=1)
    generate_shared(session, ids, mask, 4, CACHE)  # warm-up
    t0 = time.perf_counter()
    generate_shared(session, ids, mask, 32, CACHE)
    print(f"fused shared-buffer decode: {(time.perf_counter() - t0) / 32 * 1e3:.3f} ms/step")


# ---- int8/int4: the embedding gathered from 8-bit codes ------------------------------------------
@pytest.mark.parametrize("family, precision, block", [("qwen2", "int4", 16), ("llama", "int8", 32)])
def test_quantized_embedding_is_gathered_from_the_codes(family, precision, block, tmp_path):
    """int8/int4: ``GatherBlockQuantized`` of 8-bit codes; a tied head (Qwen2) reads the very same
    codes and scales (one tensor, two modules), an untied one (Llama) has its own. The rows it
    gathers are the codes' dequantized values exactly (one float32 product each, on both sides)."""
    from loraexport.core.enums import Precision
    from loraexport.export.fused_source import ModuleSource
    from loraexport.export.qformat import NBits, nbits_dequantize

    model = _model(family)
    origins: dict = {}
    fused.write_fused_decoder(
        ModuleSource(model), tmp_path / "model.onnx", Precision(precision), origins=origins, block=block
    )
    proto = onnx.load(str(tmp_path / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    gather = next(n for n in proto.graph.node if n.op_type.startswith("Gather") and "input_ids" in n.input)
    assert gather.op_type == "GatherBlockQuantized" and "embed_tokens.weight" not in inits
    name = "lm_head" if family == "qwen2" else "embed_tokens"
    assert gather.input[0] == f"{name}.weight.T_Q8"
    head = next(n for n in proto.graph.node if n.output[0] == "lm_head.out")
    assert (head.input[1] == gather.input[0]) is (family == "qwen2")
    modules = dict(origins[f"{name}.weight.T"])
    assert "model.embed_tokens" in modules and ("lm_head" in modules) is (family == "qwen2")

    table = model.model.embed_tokens.weight.detach().numpy()
    v, h = table.shape
    rows = nbits_dequantize(inits[gather.input[0]], inits[f"{name}.weight.T_scales"], NBits(h, v, 8, block)).T
    # 8-bit symmetric blocks: |error| ≤ half a step = max|block| / 127 / 2
    assert np.abs(rows - table).max() <= np.abs(table).max() / 254 + 1e-7
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(
            [n for n in proto.graph.node if "embedding" in n.output[0]],
            "embedding",
            [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
            [onnx.helper.make_tensor_value_info("embeddings", onnx.TensorProto.FLOAT, None)],
            [t for t in proto.graph.initializer if t.name.startswith((name, "const.embedding"))],
        ),
        opset_imports=proto.opset_import,
        ir_version=proto.ir_version,
    )
    ids = np.array([[0, 5, v - 1, 5]], np.int64)
    (got,) = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids}
    )
    np.testing.assert_array_equal(got[0], rows[ids[0]])  # bit for bit: the same products


def test_embedding_stays_float_when_its_rows_are_not_whole_blocks(tmp_path):
    """hidden 64 in blocks of 128: the codes would be padded; the table is gathered in float32."""
    from loraexport.core.enums import Precision
    from loraexport.export.fused_source import ModuleSource

    fused.write_fused_decoder(ModuleSource(_model("qwen2")), tmp_path / "m.onnx", Precision.INT4, block=128)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert not [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert "embed_tokens.weight" in {t.name for t in proto.graph.initializer}
