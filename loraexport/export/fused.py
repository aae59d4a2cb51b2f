"""A fused ("optimized") ONNX decoder for Llama, Mistral and Qwen2, written node by node.

Written with ``onnx.helper`` (no tracing) in the layout of onnxruntime-genai's model builder
(docs/notes/issue-13-research.md §2). Gather(embed) → RMSNorm, then 14 nodes per layer::

    MatMul(q|k|v) → Split → RotaryEmbedding(q), RotaryEmbedding(k) → GroupQueryAttention → MatMul(o)
    → SkipSimplifiedLayerNormalization → MatMul(gate|up) → Split → x·Sigmoid(x)·up → MatMul(down)
    → SkipSimplifiedLayerNormalization (the next layer's input norm, or the final norm)
then Gather(last position) → MatMul(lm_head) → Unsqueeze.

I/O names are those of the plain exports (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key|value`` → ``logits``, ``present.{i}.key|value``): ``loraexport.runtime``,
``loraexport.fused_runtime`` and onnxruntime-genai (``past_present_share_buffer`` either way) run it.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from loraexport.errors import ExportError
from loraexport.export.fused_config import check_config
from loraexport.export.onnx import EXTERNAL_DATA_BYTES
from loraexport.lora.layer import LoRALinear, WeightedLoRALinear

FAMILIES = ("llama", "mistral", "qwen2")
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
class _Linear:
    """A projection as arrays: ``y = x·Wᵀ + b + Σ c·(x·Aᵀ)·Bᵀ``."""

    weight: np.ndarray  # (out, in)
    bias: np.ndarray | None  # (out,)
    branches: tuple[tuple[np.ndarray, np.ndarray, float], ...] = ()  # A (r, in), B (out, r), c


@dataclass(frozen=True)
class _Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    theta: float
    max_positions: int


class _Graph:
    """Nodes and initializers as they are written; constants are stored once by name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.nbytes = 0
        self.branches = 0  # LoRA branches written
        self.packed = {"qkv": 0, "mlp": 0}  # layers whose group is one packed MatMul

    def weight(self, name: str, array: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(array, order="C"), name)
            self.nbytes += array.nbytes
        return name

    def const(self, name: str, values, dtype: type) -> str:
        return self.weight(f"const.{name}", np.array(values, dtype))

    def op(self, op_type: str, inputs: list[str], outputs: str | list[str], domain: str = "", **attrs):
        """Append a node; returns its output name (or names, when given a list)."""
        names = [outputs] if isinstance(outputs, str) else outputs
        node_name = f"{next(n for n in names if n)}/{op_type}"
        self.nodes.append(helper.make_node(op_type, inputs, names, node_name, domain=domain or None, **attrs))
        return outputs


# ---- reading the model --------------------------------------------------------------------------
def _array(t: torch.Tensor, where: str) -> np.ndarray:
    if t.dtype != torch.float32:
        raise ExportError(f"fused export needs float32 weights; {where} is {t.dtype}")
    return t.detach().cpu().numpy()  # shares torch's memory; copied once, into the TensorProto


def _unwrap(module: nn.Module, where: str) -> tuple[nn.Linear, list]:
    """The base ``nn.Linear`` of a projection and its LoRA branches as (A, B, c) tensors."""
    if isinstance(module, nn.Linear):
        base, branches = module, []
    elif isinstance(module, LoRALinear):
        base, branches = module.base_layer, [(module.lora_A, module.lora_B, module.scaling)]
    elif isinstance(module, WeightedLoRALinear):
        base = module.base_layer
        branches = list(zip(module.lora_A, module.lora_B, module.coefficients, strict=True))
    else:
        kinds = "nn.Linear, LoRALinear or WeightedLoRALinear"
        raise ExportError(f"fused export: {where} is a {type(module).__name__}, not {kinds}")
    if not isinstance(base, nn.Linear):
        raise ExportError(f"fused export: {where}.base_layer is a {type(base).__name__}, not nn.Linear")
    return base, branches


def _linear(module: nn.Module, where: str) -> _Linear:
    """A plain ``nn.Linear`` or one of loraexport's unmerged LoRA wrappers, as arrays."""
    base, branches = _unwrap(module, where)
    bias = None if base.bias is None else _array(base.bias, f"{where}.bias")
    arrays = [(_array(a, f"{where}.lora_A"), _array(b, f"{where}.lora_B"), float(c)) for a, b, c in branches]
    return _Linear(_array(base.weight, f"{where}.weight"), bias, tuple(arrays))


def _dims(model: nn.Module) -> _Dims:
    """The shapes the graph needs, or ``ExportError`` for a model it cannot express."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES or not all(hasattr(model, a) for a in ("model", "lm_head")):
        raise ExportError(f"fused export: {type(model).__name__} ({family!r}) is not one of {FAMILIES}")
    theta = check_config(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if not len(model.model.layers):
        raise ExportError("fused export: the model has no layers")
    attn = model.model.layers[0].self_attn
    q_out = _unwrap(attn.q_proj, "layers.0.self_attn.q_proj")[0].out_features
    k_out = _unwrap(attn.k_proj, "layers.0.self_attn.k_proj")[0].out_features
    if heads % kv_heads or head_dim % 2 or q_out != heads * head_dim or k_out != kv_heads * head_dim:
        raise ExportError(
            f"fused export: head_dim not derivable (heads {heads}, kv_heads {kv_heads}, head_dim {head_dim}, "
            f"q_proj out {q_out}, k_proj out {k_out})"
        )
    return _Dims(
        layers=len(model.model.layers),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=_unwrap(model.lm_head, "lm_head")[0].out_features,
        eps=float(config.rms_norm_eps),
        theta=theta,
        max_positions=int(config.max_position_embeddings),
    )


def _lm_head(model: nn.Module) -> _Linear:
    head = _linear(model.lm_head, "lm_head")
    embed = _array(model.model.embed_tokens.weight, "embed_tokens.weight")
    if getattr(model.config, "tie_word_embeddings", False) and not np.array_equal(head.weight, embed):
        raise ExportError("fused export: tie_word_embeddings is set but lm_head.weight != embed_tokens")
    return head  # tied: its weight is the embedding, stored transposed for the MatMul


# ---- writing the graph --------------------------------------------------------------------------
def _project(g: _Graph, x: str, lin: _Linear, name: str) -> str:
    """``x·Wᵀ (+ b)`` then each LoRA branch, unmerged, added to it."""
    y = g.op("MatMul", [x, g.weight(f"{name}.weight.T", lin.weight.T)], f"{name}.out")
    if lin.bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", lin.bias)], f"{name}.biased")
    for j, (a, b, c) in enumerate(lin.branches):
        g.branches += 1
        down = g.op("MatMul", [x, g.weight(f"{name}.lora_A.{j}.T", a.T)], f"{name}.lora.{j}.down")
        up = g.op("MatMul", [down, g.weight(f"{name}.lora_B.{j}.T", b.T)], f"{name}.lora.{j}.up")
        coefficient = g.weight(f"{name}.lora_c.{j}", np.array(c, np.float32))
        scaled = g.op("Mul", [up, coefficient], f"{name}.lora.{j}.c")
        y = g.op("Add", [y, scaled], f"{name}.lora.{j}.sum")
    return y


def _project_group(g: _Graph, x: str, lins: dict[str, _Linear], prefix: str, group: str) -> list[str]:
    """Several projections of ``x``: one packed MatMul + Split when none has LoRA branches."""
    if any(lin.branches for lin in lins.values()):
        return [_project(g, x, lin, f"{prefix}.{n}") for n, lin in lins.items()]
    g.packed[group] += 1
    sizes = [lin.weight.shape[0] for lin in lins.values()]
    weight = np.concatenate([lin.weight for lin in lins.values()], axis=0)  # (Σ out, in)
    bias = None
    if any(lin.bias is not None for lin in lins.values()):
        bias = np.concatenate([np.zeros(n, np.float32) if lin.bias is None else lin.bias
                               for n, lin in zip(sizes, lins.values(), strict=True)])  # fmt: skip
    packed = _project(g, x, _Linear(weight, bias), f"{prefix}.{'_'.join(lins)}")
    split = g.const("split." + "_".join(map(str, sizes)), sizes, np.int64)
    return g.op("Split", [packed, split], [f"{prefix}.{n}.out" for n in lins], axis=-1)


def _mask_inputs(g: _Graph) -> tuple[str, str, str]:
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


def _rotary_caches(g: _Graph, d: _Dims) -> tuple[str, str]:
    """cos/sin (max_positions, head_dim/2) as HF computes them (float32, rotate_half halves)."""
    inv_freq = 1.0 / (d.theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float) / d.head_dim))
    freqs = torch.arange(d.max_positions, dtype=torch.float)[:, None] * inv_freq  # (P, D/2)
    return g.weight("rotary.cos", freqs.cos().numpy()), g.weight("rotary.sin", freqs.sin().numpy())


def _attention(g: _Graph, x: str, attn: nn.Module, i: int, d: _Dims, shared: tuple) -> str:
    """q/k/v → RoPE → GroupQueryAttention (cache ``past_key_values.i`` → ``present.i``) → o_proj."""
    seqlens, total, bias, cos, sin = shared
    p = f"layers.{i}.attn"
    names = ("q_proj", "k_proj", "v_proj")
    lins = {n: _linear(getattr(attn, n), f"layers.{i}.self_attn.{n}") for n in names}
    q, k, v = _project_group(g, x, lins, p, "qkv")
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
    return _project(g, out, _linear(attn.o_proj, f"layers.{i}.self_attn.o_proj"), f"{p}.o_proj")


def _mlp(g: _Graph, x: str, mlp: nn.Module, i: int) -> str:
    """``down(silu(gate(x)) · up(x))`` with SiLU written as x·Sigmoid(x)."""
    p = f"layers.{i}.mlp"
    lins = {n: _linear(getattr(mlp, n), f"layers.{i}.mlp.{n}") for n in ("gate_proj", "up_proj")}
    gate, up = _project_group(g, x, lins, p, "mlp")
    sig = g.op("Sigmoid", [gate], f"{p}.sigmoid")
    act = g.op("Mul", [gate, sig], f"{p}.silu")
    h = g.op("Mul", [act, up], f"{p}.gated")
    return _project(g, h, _linear(mlp.down_proj, f"layers.{i}.mlp.down_proj"), f"{p}.down_proj")


def _rms_norm(g: _Graph, x: str, norm: nn.Module, name: str, eps: float) -> str:
    """x / sqrt(mean(x²) + eps) · w in opset-21 ops: SimplifiedLayerNormalization lives in the ONNX
    domain in onnxruntime only (onnx.checker: "No Op registered for SimplifiedLayerNormalization
    with domain_version of 21"); onnxruntime (extended level and up) fuses this chain into it."""
    w = g.weight(f"{name}.weight", _array(norm.weight, f"{name}.weight"))
    square = g.op("Pow", [x, g.const("two", 2.0, np.float32)], f"{name}.square")
    mean = g.op("ReduceMean", [square, g.const("last_axis", [-1], np.int64)], f"{name}.mean", keepdims=1)
    var = g.op("Add", [mean, g.const(f"eps.{eps}", eps, np.float32)], f"{name}.var")
    normed = g.op("Div", [x, g.op("Sqrt", [var], f"{name}.rms")], f"{name}.normed")
    return g.op("Mul", [normed, w], f"{name}.out")


def _skip_norm(g: _Graph, x: str, residual: str, norm: nn.Module, name: str, eps: float) -> tuple[str, str]:
    """RMSNorm(x + residual) and that sum, the next residual."""
    w = g.weight(f"{name}.weight", _array(norm.weight, f"{name}.weight"))
    outs = [f"{name}.out", "", "", f"{name}.residual"]  # output 3: input + skip
    out, _, _, total = g.op(
        "SkipSimplifiedLayerNormalization", [x, residual, w], outs, domain=MS, epsilon=eps
    )
    return out, total


def _layer(g: _Graph, layer: nn.Module, i: int, d: _Dims, shared: tuple, h: str, residual: str, after):
    """One decoder layer from its normed input ``h`` and the residual stream, ending with the next
    norm (``after``: the next layer's input norm or the final norm, and its name); returns the
    next normed input and residual."""
    attn = _attention(g, h, layer.self_attn, i, d, shared)
    h, residual = _skip_norm(
        g, attn, residual, layer.post_attention_layernorm, f"layers.{i}.post_norm", d.eps
    )
    return _skip_norm(g, _mlp(g, h, layer.mlp, i), residual, *after, d.eps)


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
    """Write ``model`` (Llama/Mistral/Qwen2 causal LM, float32) as a fused decoder graph at ``path``.

    Returns a description: ``layout``, ``attention``, ``kv_cache``, ``logits``, ``nodes``,
    ``nodes_per_layer`` (the largest layer), ``layers``, ``packed_qkv_layers``,
    ``packed_mlp_layers``, ``lora_branches``, ``external_data``. Raises ``ExportError`` for a model
    the graph cannot express.
    """
    path = Path(path)
    d = _dims(model)
    head = _lm_head(model)
    g = _Graph()
    embed = g.weight("embed_tokens.weight", _array(model.model.embed_tokens.weight, "embed_tokens.weight"))
    residual = g.op("Gather", [embed, "input_ids"], "embeddings")  # (B, S, H)
    shared = (*_mask_inputs(g), *_rotary_caches(g, d))
    layers = list(model.model.layers)
    h = _rms_norm(g, residual, layers[0].input_layernorm, "layers.0.input_norm", d.eps)
    norms = [(layer.input_layernorm, f"layers.{i}.input_norm") for i, layer in enumerate(layers)][1:]
    layer_nodes = []
    for i, (layer, after) in enumerate(zip(layers, [*norms, (model.model.norm, "final_norm")], strict=True)):
        start = len(g.nodes)
        h, residual = _layer(g, layer, i, d, shared, h, residual, after)
        layer_nodes.append(len(g.nodes) - start)
    last = g.op("Gather", [h, g.const("minus_one", -1, np.int64)], "last_hidden", axis=1)  # (B, H)
    scores = _project(g, last, head, "lm_head")  # (B, V)
    g.op("Unsqueeze", [scores, g.const("axis1", [1], np.int64)], "logits")  # (B, 1, V)
    inputs, outputs = _io(d)
    graph = helper.make_graph(g.nodes, "fused_decoder", inputs, outputs, list(g.initializers.values()))
    opsets = [helper.make_opsetid(domain, version) for domain, version in OPSETS.items()]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="loraexport")
    return {
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
        "external_data": _save(proto, path, g.nbytes),
    }
