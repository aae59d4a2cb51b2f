"""int8-dynamic: ``quantize_dynamic`` of a graph's MatMuls (int8 weights per output channel), its
activation quantizers then rewritten to scale each row alone (``per_token_activations``). Called by
``export.quantize.quantize_graph``, for the export and for the proof's export of the reference
alike; ``export.qformat.per_token_input`` reads the chain back (verify's float twin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# int8-dynamic's activations (loraexport.json's quantization settings; ``per_token_activations``)
ACTIVATIONS_PER_TOKEN = "uint8 per token at run time: max |x| / 127 a row, zero point 128"


def dynamic(source: Path, target: Path, exclude: set[str], external: bool) -> None:
    """``quantize_dynamic`` of every MatMul with a constant weight but ``exclude``, its
    activations then quantized per token (``per_token_activations``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=sorted(exclude),
        use_external_data_format=external,
        # onnxruntime's contrib ops (--optimize) have no ONNX shape inference
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    model = onnx.load(str(target), load_external_data=False)  # the weights stay where they are
    if per_token_activations(model):
        onnx.save(model, str(target))


def per_token_activations(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each ``DynamicQuantizeLinear`` that feeds ``MatMulInteger`` (one uint8
    scale and zero point for a whole activation tensor) so that each row of the activation (a
    token: the last axis is K) has its own scale; return how many.

    Its outputs keep their names and roles: the codes ``round(x / s) + 128`` as uint8 (|x| ≤
    127·s by construction, so every code is in [1, 255]), ``s`` = max|x| / 127 over the row
    (shape (..., 1); at least float32's smallest normal, so an all-zero row gives codes 128, not
    NaN), and the zero point 128: one scalar constant, which each ``MatMulInteger`` now reads
    (its fast form takes uint8 codes and one zero point; int8 codes take a path 20× slower,
    measured). The ``Mul`` of ``s`` by the weight's per-channel scales that ``quantize_dynamic``
    writes then broadcasts per row: nothing else downstream changes. Written in opset-13 ops (a
    graph of any opset the exporters write; ``ReduceMax``'s axes by opset), eight small nodes
    per quantizer instead of one; ``per_token_input`` reads the chain back."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {
        "per_token.inv_levels": np.array(1 / 127, np.float32),
        "per_token.tiny": np.array(np.finfo(np.float32).tiny, np.float32),
        "per_token.offset": np.array(128, np.float32),
        "per_token.zero_point": np.array(128, np.uint8),
    }
    if opset >= 18:
        constants["per_token.last_axis"] = np.array([-1], np.int64)
    nodes, count = [], 0
    for n in model.graph.node:
        users = consumers.get(n.output[0], []) if n.op_type == "DynamicQuantizeLinear" else []
        if not users or any(u.op_type != "MatMulInteger" or u.input[1] not in weights for u in users):
            nodes.append(n)
            continue
        x, (codes, scale, _) = n.input[0], n.output
        p = f"{n.name or x}/per_token"
        if opset >= 18:
            amax = helper.make_node("ReduceMax", [f"{p}.abs", "per_token.last_axis"], [f"{p}.amax"],
                                    name=f"{p}/ReduceMax", keepdims=1)  # fmt: skip
        else:
            amax = helper.make_node(
                "ReduceMax", [f"{p}.abs"], [f"{p}.amax"], name=f"{p}/ReduceMax", axes=[-1], keepdims=1
            )
        nodes += [
            helper.make_node("Abs", [x], [f"{p}.abs"], name=f"{p}/Abs"),
            amax,
            helper.make_node("Mul", [f"{p}.amax", "per_token.inv_levels"], [f"{p}.scale0"], name=f"{p}/Mul"),
            helper.make_node("Max", [f"{p}.scale0", "per_token.tiny"], [scale], name=f"{p}/Max"),
            helper.make_node("Div", [x, scale], [f"{p}.scaled"], name=f"{p}/Div"),
            helper.make_node("Round", [f"{p}.scaled"], [f"{p}.rounded"], name=f"{p}/Round"),
            helper.make_node("Add", [f"{p}.rounded", "per_token.offset"], [f"{p}.shifted"], name=f"{p}/Add"),
            helper.make_node("Cast", [f"{p}.shifted"], [codes], name=f"{p}/Cast", to=onnx.TensorProto.UINT8),
        ]  # fmt: skip
        for u in users:  # the zero point is the one constant now
            u.input[2] = "per_token.zero_point"
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        have = {t.name for t in model.graph.initializer}
        model.graph.initializer.extend(
            numpy_helper.from_array(v, k) for k, v in constants.items() if k not in have
        )
    return count
