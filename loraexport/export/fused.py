"""A fused ("optimized") ONNX decoder for Llama, Mistral and Qwen2, written node by node.

Written with ``onnx.helper`` (no tracing) in the layout of onnxruntime-genai's model builder
(docs/notes/issue-13-research.md §2). Gather(embed) → RMSNorm, then 14 nodes per layer::

    MatMul(q|k|v) → Split → RotaryEmbedding(q), RotaryEmbedding(k) → GroupQueryAttention → MatMul(o)
    → SkipSimplifiedLayerNormalization → MatMul(gate|up) → Split → x·Sigmoid(x)·up → MatMul(down)
    → SkipSimplifiedLayerNormalization (the next layer's input norm, or the final norm)
then Gather(last position) → MatMul(lm_head) → Unsqueeze.

I/O names are those of the plain exports (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key|value`` → ``logits``, ``present.{i}.key|value``): ``loraexport.runtime``,
``loraexport.runtime.fused`` and onnxruntime-genai (``past_present_share_buffer`` either way) run it.

Supported calls (GroupQueryAttention on CPU, measured):
- a prompt pass with no past (past length 0, or a shared buffer not yet written), any batch;
- single-token steps with a past, any batch: a growing past (present = past + 1), or ONE
  ``(B, kv_heads, MAX, head_dim)`` buffer bound as both past and present (written in place);
- several new tokens after a past: batch 1 only ("batch_size must be 1 when sequence_length > 1
  and past context is given").
Batches are LEFT-padded: rows' caches are aligned (``seqlens_k`` = total − 1 for all rows), pad
columns masked by an additive ``attention_bias`` built from ``attention_mask``; ``logits`` holds
the last position only, (batch, 1, vocab). Positions must be < max_position_embeddings.

LoRA wrappers (``LoRALinear``, ``WeightedLoRALinear``) stay unmerged: each branch is
``MatMul(x, Aᵀ) → MatMul(·, Bᵀ) → Mul(c) → Add`` with Aᵀ and Bᵀ stored exactly as the adapter holds
them, and the projections of a group with branches are not packed.

The weights come from a *source*: ``ModuleSource`` (a model in memory, for ``--optimize``) or
``export.streamed.CheckpointSource`` (a safetensors checkpoint read tensor by tensor, for models
larger than memory). With a streamed writer (``write_fused_decoder(..., streamed=True)``) each
initializer goes to ``model.onnx.data`` as soon as it is made, in float32, half precision (behind a
``Cast``) or quantized to ``MatMulNBits`` on the fly: memory stays near the largest tensor group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from loraexport.core.enums import Precision
from loraexport.errors import ExportError, ModelFormatError
from loraexport.export.fused_source import ModuleSource, Source, _Linear
from loraexport.export.graph_writer import BITS, Graph, Sink
from loraexport.export.onnx import EXTERNAL_DATA_BYTES
from loraexport.models.hf.decoder_config import check_fused

OPSETS = {"": 21, "com.microsoft": 1}
IR_VERSION = 10  # what opset 21 needs; onnxruntime 1.32 loads it (the genai builder writes 10 too)
MS = "com.microsoft"
# Additive bias on pad key columns. Finite: a query whose causal window is all padding (a left-pad
# row) softmaxes to a finite average once the kernel subtracts the row max (-inf: exp(-inf+inf) =
# NaN). Next to a real column exp(-1e9 + gap) is exactly 0 in float32 (underflow below ~-104), so
# kept rows equal an exact mask; and 1e9 is far from float32's 3.4e38, so adding scores or a second
# mask cannot overflow to -inf. float32 graphs only (float16 would round it to -inf).
MASK_BIAS = -1e9


@dataclass(frozen=True)
class _Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    inv_freq: torch.Tensor  # RoPE's (head_dim / 2,), float32
    max_positions: int


def _dims(src: Source) -> _Dims:
    """The shapes the graph needs, or ``ExportError`` for a model it cannot express."""
    c = check_fused(src.decoder)
    heads, kv_heads, head_dim = c.heads, c.kv, c.head_dim
    if not src.layers:
        raise ExportError("fused export: the model has no layers")
    q_out = src.linear_shape("model.layers.0.self_attn.q_proj")[0]
    k_out = src.linear_shape("model.layers.0.self_attn.k_proj")[0]
    if heads % kv_heads or head_dim % 2 or q_out != heads * head_dim or k_out != kv_heads * head_dim:
        raise ExportError(
            f"fused export: head_dim not derivable (heads {heads}, kv_heads {kv_heads}, head_dim {head_dim}, "
            f"q_proj out {q_out}, k_proj out {k_out})"
        )
    vocab, hidden = src.linear_shape("lm_head")
    _check_rotary_bytes(int(c.max_positions), len(c.inv_freq()), vocab * hidden * 4)
    return _Dims(
        layers=src.layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        eps=c.eps,
        inv_freq=c.inv_freq(),
        max_positions=int(c.max_positions),
    )


# The rotary tables (cos and sin, max_positions × rotary_dim/2 float32 each) may take this much, or
# as much as the embedding table: real long-context models stay far below both (Qwen2.5-7B-1M:
# 0.5 GB against a 2.2 GB embedding), while a config's positions and head size, each within its own
# range, could ask for 16 GB from a checkpoint of kilobytes.
ROTARY_FLOOR_BYTES = 256 * 2**20


def _check_rotary_bytes(positions: int, half: int, embedding_bytes: int) -> None:
    need = positions * half * 4 * 2
    if need > max(ROTARY_FLOOR_BYTES, embedding_bytes):
        raise ModelFormatError(
            f"config.json: max_position_embeddings {positions} with a rotary dimension of {2 * half} "
            f"needs {need / 2**20:,.0f} MiB of cos/sin tables, more than the embedding's "
            f"{embedding_bytes / 2**20:,.1f} MiB and {ROTARY_FLOOR_BYTES // 2**20} MiB: "
            "is max_position_embeddings right?"
        )


# ---- writing the graph --------------------------------------------------------------------------
def _project(g: Graph, x: str, lin: _Linear, name: str, wide: bool = False, parts: tuple = ()) -> str:
    """``x·Wᵀ (+ b)`` then each LoRA branch, unmerged (float32), added to it; ``parts``: the
    modules ``lin`` holds, (path, rows) each (``Graph.origins``)."""
    y = g.matmul(x, lin.weight, name, wide, parts)
    if lin.bias is not None:
        y = g.op("Add", [y, g.tensor(f"{name}.bias", lin.bias.to(torch.float32))], f"{name}.biased")
    for j, (a, b, c) in enumerate(lin.branches):
        g.branches += 1
        down = g.op(
            "MatMul", [x, g.tensor(f"{name}.lora_A.{j}.T", a.T.to(torch.float32))], f"{name}.lora.{j}.down"
        )
        up = g.op(
            "MatMul", [down, g.tensor(f"{name}.lora_B.{j}.T", b.T.to(torch.float32))], f"{name}.lora.{j}.up"
        )
        coefficient = g.weight(f"{name}.lora_c.{j}", np.array(c, np.float32))
        scaled = g.op("Mul", [up, coefficient], f"{name}.lora.{j}.c")
        y = g.op("Add", [y, scaled], f"{name}.lora.{j}.sum")
    return y


def _project_group(
    g: Graph, x: str, src: Source, paths: dict[str, str], prefix: str, group: str
) -> list[str]:
    """Several projections of ``x``: one packed MatMul + Split when none has LoRA branches."""
    lins = {n: src.linear(p) for n, p in paths.items()}
    if any(lin.branches for lin in lins.values()):
        return [
            _project(g, x, lin, f"{prefix}.{n}", parts=((paths[n], lin.weight.shape[0]),))
            for n, lin in lins.items()
        ]
    g.packed[group] += 1
    sizes = [lin.weight.shape[0] for lin in lins.values()]
    weight = torch.cat([lin.weight for lin in lins.values()], dim=0)  # (Σ out, in)
    bias = None
    if any(lin.bias is not None for lin in lins.values()):
        bias = torch.cat([torch.zeros(n) if lin.bias is None else lin.bias.to(torch.float32)
                          for n, lin in zip(sizes, lins.values(), strict=True)])  # fmt: skip
    del lins
    parts = tuple(zip(paths.values(), sizes, strict=True))
    packed = _project(g, x, _Linear(weight, bias), f"{prefix}.{'_'.join(paths)}", parts=parts)
    split = g.const("split." + "_".join(map(str, sizes)), sizes, np.int64)
    return g.op("Split", [packed, split], [f"{prefix}.{n}.out" for n in paths], axis=-1)


def _mask_inputs(g: Graph) -> tuple[str, str, str]:
    """``seqlens_k`` (B,) int32 = total − 1 for every row, ``total_sequence_length`` int32 scalar,
    and the additive ``attention_bias`` (B, 1, S, total): 0 on kept columns, MASK_BIAS on padding."""
    total_1d = g.op("Shape", ["attention_mask"], "mask.total_i64", start=1, end=2)  # (1,) = [T]
    total32 = g.op("Cast", [total_1d], "mask.total_i32", to=TensorProto.INT32)
    total = g.op("Squeeze", [total32], "total_sequence_length")  # scalar
    batch = g.op("Shape", ["input_ids"], "mask.batch", start=0, end=1)  # (1,) = [B]
    last = g.op("Sub", [total32, g.const("one_i32", [1], np.int32)], "mask.last")
    seqlens = g.op("Expand", [last, batch], "seqlens_k")  # rows aligned: all see T columns
    keep = g.op("Cast", ["attention_mask"], "mask.keep", to=TensorProto.BOOL)
    zero, neg = g.const("zero", 0, np.float32), g.const("mask_bias", MASK_BIAS, np.float32)
    bias2d = g.op("Where", [keep, zero, neg], "mask.bias2d")  # (B, T)
    bias4d = g.op("Unsqueeze", [bias2d, g.const("axes12", [1, 2], np.int64)], "mask.bias4d")  # (B, 1, 1, T)
    seq = g.op("Shape", ["input_ids"], "mask.sequence", start=1, end=2)  # (1,) = [S]
    one = g.const("one_i64", [1], np.int64)
    shape = g.op("Concat", [batch, one, seq, total_1d], "mask.bias_shape", axis=0)
    # spelt out, as GQA asks: "attention_bias dimension 2 must be equal to the sequence length, got 1"
    bias = g.op("Expand", [bias4d, shape], "attention_bias")  # (B, 1, S, T)
    return seqlens, total, bias


def _rotary_caches(g: Graph, d: _Dims) -> tuple[str, str]:
    """cos/sin (max_positions, head_dim/2) as HF computes them (float32, rotate_half halves)."""
    freqs = torch.arange(d.max_positions, dtype=torch.float)[:, None] * d.inv_freq  # (P, D/2)
    return g.weight("rotary.cos", freqs.cos().numpy()), g.weight("rotary.sin", freqs.sin().numpy())


def _attention(g: Graph, x: str, src: Source, i: int, d: _Dims, shared: tuple) -> str:
    """q/k/v → RoPE → GroupQueryAttention (cache ``past_key_values.i`` → ``present.i``) → o_proj."""
    seqlens, total, bias, cos, sin = shared
    p, where = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
    paths = {n: f"{where}.{n}" for n in ("q_proj", "k_proj", "v_proj")}
    q, k, v = _project_group(g, x, src, paths, p, "qkv")
    q = g.op("RotaryEmbedding", [q, "position_ids", cos, sin], f"{p}.q_rot", domain=MS, interleaved=0)
    k = g.op("RotaryEmbedding", [k, "position_ids", cos, sin], f"{p}.k_rot", domain=MS, interleaved=0)
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    out, _, _ = g.op(
        "GroupQueryAttention",
        [q, k, v, *past, seqlens, total, "", "", "", bias],
        [f"{p}.out", f"present.{i}.key", f"present.{i}.value"],
        domain=MS,
        num_heads=d.heads,
        kv_num_heads=d.kv_heads,
        scale=float(d.head_dim**-0.5),
        do_rotary=0,
    )
    o_proj = src.linear(f"{where}.o_proj")
    parts = ((f"{where}.o_proj", o_proj.weight.shape[0]),)
    return _project(g, out, o_proj, f"{p}.o_proj", parts=parts)


def _mlp(g: Graph, x: str, src: Source, i: int) -> str:
    """``down(silu(gate(x)) · up(x))`` with SiLU written as x·Sigmoid(x)."""
    p, where = f"layers.{i}.mlp", f"model.layers.{i}.mlp"
    gate, up = _project_group(g, x, src, {n: f"{where}.{n}" for n in ("gate_proj", "up_proj")}, p, "mlp")
    sig = g.op("Sigmoid", [gate], f"{p}.sigmoid")
    act = g.op("Mul", [gate, sig], f"{p}.silu")
    h = g.op("Mul", [act, up], f"{p}.gated")
    down = src.linear(f"{where}.down_proj")
    parts = ((f"{where}.down_proj", down.weight.shape[0]),)
    return _project(g, h, down, f"{p}.down_proj", wide=True, parts=parts)


def _rms_norm(g: Graph, x: str, weight: torch.Tensor, name: str, eps: float) -> str:
    """x / sqrt(mean(x²) + eps) · w in opset-21 ops: SimplifiedLayerNormalization lives in the ONNX
    domain in onnxruntime only (onnx.checker: "No Op registered for SimplifiedLayerNormalization
    with domain_version of 21"); onnxruntime (extended level and up) fuses this chain into it."""
    w = g.tensor(f"{name}.weight", weight.to(torch.float32))
    square = g.op("Pow", [x, g.const("two", 2.0, np.float32)], f"{name}.square")
    mean = g.op("ReduceMean", [square, g.const("last_axis", [-1], np.int64)], f"{name}.mean", keepdims=1)
    var = g.op("Add", [mean, g.const(f"eps.{eps}", eps, np.float32)], f"{name}.var")
    normed = g.op("Div", [x, g.op("Sqrt", [var], f"{name}.rms")], f"{name}.normed")
    return g.op("Mul", [normed, w], f"{name}.out")


def _skip_norm(
    g: Graph, x: str, residual: str, weight: torch.Tensor, name: str, eps: float
) -> tuple[str, str]:
    """RMSNorm(x + residual) and that sum, the next residual."""
    w = g.tensor(f"{name}.weight", weight.to(torch.float32))
    outs = [f"{name}.out", "", "", f"{name}.residual"]  # output 3: input + skip
    out, _, _, total = g.op(
        "SkipSimplifiedLayerNormalization", [x, residual, w], outs, domain=MS, epsilon=eps
    )
    return out, total


def _layer(g: Graph, src: Source, i: int, d: _Dims, shared: tuple, h: str, residual: str, after):
    """One decoder layer from its normed input ``h`` and the residual stream, ending with the next
    norm (``after``: the next layer's input norm or the final norm: its tensor name and node
    name); returns the next normed input and residual."""
    attn = _attention(g, h, src, i, d, shared)
    norm = src.vector(f"model.layers.{i}.post_attention_layernorm.weight")
    h, residual = _skip_norm(g, attn, residual, norm, f"layers.{i}.post_norm", d.eps)
    return _skip_norm(g, _mlp(g, h, src, i), residual, src.vector(after[0]), after[1], d.eps)


def _io(d: _Dims) -> tuple[list, list]:
    """Graph inputs and outputs; ``logits`` dim 1 is the static 1 genai needs to see it pruned."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    cache = [(i, k) for i in range(d.layers) for k in ("key", "value")]

    def kv(name: str, length: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, f32, ["batch", d.kv_heads, length, d.head_dim])

    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"]),
        *(kv(f"past_key_values.{i}.{k}", "past_sequence") for i, k in cache),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f32, ["batch", 1, d.vocab]),
        *(kv(f"present.{i}.{k}", "present_sequence") for i, k in cache),
    ]
    return inputs, outputs


def _save(proto: onnx.ModelProto, path: Path, nbytes: int) -> bool:
    """Write ``path``; weights go to ``<name>.data`` beside it when over EXTERNAL_DATA_BYTES."""
    external = nbytes > EXTERNAL_DATA_BYTES
    options = {"save_as_external_data": True, "all_tensors_to_one_file": True, "size_threshold": 1024}
    onnx.save_model(proto, str(path), **({**options, "location": f"{path.name}.data"} if external else {}))
    return external


def build_fused_decoder(model: nn.Module, path: Path) -> dict:
    """Write ``model`` (Llama/Mistral/Qwen2 causal LM, float32, in memory) as a fused decoder graph
    at ``path``; see ``write_fused_decoder``."""
    return write_fused_decoder(ModuleSource(model), path)


def write_fused_decoder(
    src: Source,
    path: Path,
    precision: Precision = Precision.FLOAT32,
    *,
    streamed: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    origins: dict | None = None,
    block: int | None = None,
) -> dict:
    """Write the fused decoder graph of ``src`` at ``path`` (``origins``: see ``build_fused_graph``;
    ``block``: int8/int4's block size, default ``export.quantize.NBITS_BLOCK``).

    ``precision``: the projections' storage (float32; float16/bfloat16 behind a Cast; int8/int4 as
    MatMulNBits, quantized here one weight at a time). ``streamed``: every initializer goes to
    ``<path>.data`` as soon as it is made, so memory holds one tensor group, never the model.

    Returns a description: ``layout``, ``attention``, ``kv_cache``, ``logits``, ``nodes``,
    ``nodes_per_layer`` (the largest layer), ``layers``, ``packed_qkv_layers``,
    ``packed_mlp_layers``, ``lora_branches``, ``external_data`` (and ``weights``, ``quantized``
    for a graph not in float32). Raises ``ExportError`` for a model the graph cannot express.
    """
    path = Path(path)
    sink = Sink(path.with_name(path.name + ".data")) if streamed else None
    try:
        proto, g, info = build_fused_graph(src, precision, sink, on_bytes, origins, block)
    finally:
        if sink is not None:
            sink.close()
    if sink is not None:
        onnx.save_model(proto, str(path))  # the graph; its tensors are in the data file already
        external = True
    else:
        external = _save(proto, path, g.nbytes)
    return info | {"external_data": external}


def build_fused_graph(
    src: Source,
    precision: Precision = Precision.FLOAT32,
    sink: Sink | None = None,
    on_bytes: Callable[[int], None] | None = None,
    origins: dict | None = None,
    block: int | None = None,
) -> tuple[onnx.ModelProto, Graph, dict]:
    """The fused decoder graph of ``src`` as a model (its initializers handed to ``sink`` as they
    are made, when given: a file's, or verify's comparison with a file), the ``Graph`` that made it
    (``origins``: which modules each projection holds, into ``origins`` when given) and
    ``write_fused_decoder``'s description."""
    d = _dims(src)
    g = Graph(precision, sink, on_bytes, block)
    if origins is not None:
        g.origins = origins
    embed = src.embedding()
    # int8/int4: the embedding as 8-bit codes, a tied LM head's own; with the adapter kept in float32
    # (--keep-adapter: fidelity to the adapter first) the table stays float32, as the branches do
    quantized = precision in BITS and not src.kept()
    tied = quantized and src.tied_head()
    residual = g.embedding(embed, "input_ids", "lm_head" if tied else None, quantized)
    del embed
    shared = (*_mask_inputs(g), *_rotary_caches(g, d))
    first = src.vector("model.layers.0.input_layernorm.weight")
    h = _rms_norm(g, residual, first, "layers.0.input_norm", d.eps)
    after = [
        (f"model.layers.{i}.input_layernorm.weight", f"layers.{i}.input_norm") for i in range(1, d.layers)
    ]
    after.append(("model.norm.weight", "final_norm"))
    layer_nodes = []
    for i in range(d.layers):
        start = len(g.nodes)
        h, residual = _layer(g, src, i, d, shared, h, residual, after[i])
        layer_nodes.append(len(g.nodes) - start)
    last = g.op("Gather", [h, g.const("minus_one", -1, np.int64)], "last_hidden", axis=1)  # (B, H)
    head = src.lm_head()
    scores = _project(g, last, head, "lm_head", wide=True, parts=(("lm_head", d.vocab),))  # (B, V)
    del head
    g.op("Unsqueeze", [scores, g.const("axis1", [1], np.int64)], "logits")  # (B, 1, V)
    inputs, outputs = _io(d)
    graph = helper.make_graph(g.nodes, "fused_decoder", inputs, outputs, list(g.initializers.values()))
    opsets = [helper.make_opsetid(domain, version) for domain, version in OPSETS.items()]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="loraexport")
    info = {
        "layout": "fused",
        "attention": "GroupQueryAttention",
        "kv_cache": "shared-buffer",
        "logits": "last-position",
        "nodes": len(g.nodes),
        "nodes_per_layer": max(layer_nodes),
        "layers": d.layers,
        "packed_qkv_layers": g.packed["qkv"],
        "packed_mlp_layers": g.packed["mlp"],
        "lora_branches": g.branches,
        "external_data": sink is not None,
    }
    if precision is not Precision.FLOAT32:
        info["weights"] = precision.value
    if any(g.quantized.values()):
        info["quantized"] = {f"int{b}": n for b, n in g.quantized.items() if n}
    return proto, g, info
