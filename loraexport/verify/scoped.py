"""The float graph a quantized torch.onnx file was made from, rebuilt from the file itself and
the reference model, without exporting the reference again (``stages.prove``'s fast path).

torch.onnx names each node by the module that made it (``/model/model/layers.0/self_attn/
q_proj/MatMul``), and each weight it did not fold by its parameter's name. So every
``MatMulNBits`` node of the file names the module whose weight it must hold, and every other
initializer the parameter it must be. ``scoped_float_graph`` puts the reference's float32 weights
there, each as the exporter stores it, and returns that float graph; the proof then quantizes it
with the settings ``loraexport.json`` records and compares the result with the file, tensor by
tensor. The mapping is checked both ways: each quantized node names exactly one linear module,
each linear module is named by exactly one node, and every other parameter is an initializer of
its own name (or equal to one: torch.onnx stores equal tensors once, as a tiny model's norms).

What this does not prove is the wiring: the nodes around the weights are the file's own. A file
whose nodes name other modules than the ones they compute with is caught by parity against the
dequantized reference (the weights the proof accepted, placed where the names say), not here.
Anything this cannot map (a node with no module scope, an initializer that is no parameter's,
a module left over) returns None, and the proof exports the reference again instead.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from loraexport.lora.inject import is_transposed, linear_shape
from loraexport.verify.proof import Origins

QUANTIZED_NODE = re.compile(r"^(?P<node>/.+)_Q(?P<bits>[48])$")
QUANTIZED_TENSORS = ("_Q{bits}", "_scales", "_zero_points")  # what the quantizer adds to a weight's name


def module_of(node: str, modules: dict[str, nn.Module]) -> str | None:
    """The module a torch.onnx node name's scope names (``/model/lm_head/MatMul`` ->
    ``model.lm_head``), if ``modules`` has it; else None."""
    parts = node.strip("/").split("/")[:-1]
    path = ".".join(parts)
    return path if parts and path in modules else None


def scoped_float_graph(
    proto: onnx.ModelProto, module: nn.Module, model: nn.Module
) -> tuple[onnx.ModelProto, Origins] | None:
    """(the float graph ``proto`` (a quantized file's graph, weights not loaded) was quantized
    from, holding ``module``'s weights where its node and tensor names say; {float weight:
    ((module path in ``model``, -1),)}), or None where a name does not map to exactly one of
    ``module``'s layers or parameters. ``module``: the graph's (``GraphSpec.module``, which
    wraps ``model``)."""
    modules = dict(module.named_modules())
    paths = {id(m): p for p, m in model.named_modules()}
    params = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers())
    graph = onnx.ModelProto()
    graph.CopyFrom(proto)
    del graph.graph.initializer[:]
    inits = {t.name: t for t in proto.graph.initializer}
    if len(inits) != len(proto.graph.initializer):
        return None
    origins: Origins = {}
    taken: set[str] = set()  # initializers of the file the rebuilt graph accounts for
    claimed: list[str] = []  # linear modules, once per quantized node
    out: list[onnx.TensorProto] = []
    for node in graph.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        made = _float_matmul(node, modules, inits)
        if made is None:
            return None
        path, weight, tensors = made
        if weight.name in origins or taken & set(tensors) or id(modules[path]) not in paths:
            return None
        origins[weight.name] = ((paths[id(modules[path])], -1),)
        claimed.append(path)
        taken.update(tensors)
        out.append(weight)
    used_params, stored = set(), set()
    for name, t in inits.items():
        if name in taken:
            continue
        p = params.get(name)
        if p is None or onnx.helper.tensor_dtype_to_np_dtype(t.data_type) != np.float32:
            return None  # a tensor no parameter claims, or one stored in another type: not mapped here
        value = p.detach().float().cpu().numpy()
        if tuple(t.dims) != value.shape:
            return None
        out.append(numpy_helper.from_array(value, name))
        used_params.add(id(p))
        stored.add((value.shape, value.tobytes()))
    linear = {p for p, m in modules.items() if linear_shape(m) is not None}
    if sorted(claimed) != sorted(linear):  # each linear module by exactly one node
        return None
    held = {id(modules[m].weight) for m in claimed}  # a bias is its own initializer, by name
    for p in dict(module.named_parameters()).values():  # every parameter: its module's, or by name
        if id(p) in used_params or id(p) in held:
            continue
        value = p.detach().float().cpu().numpy()
        if (value.shape, value.tobytes()) not in stored:  # torch.onnx stores equal tensors once
            return None
    graph.graph.initializer.extend(out)
    return graph, origins


def _float_matmul(
    node: onnx.NodeProto, modules: dict[str, nn.Module], inits: dict[str, onnx.TensorProto]
) -> tuple[str, onnx.TensorProto, tuple[str, ...]] | None:
    """``node`` (a MatMulNBits the quantizer made of a MatMul) turned back into that MatMul, in
    place: (module, its float weight as the MatMul reads it, the file's tensors it replaces)."""
    named = QUANTIZED_NODE.match(node.name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if named is None or len(node.input) < 3 or len(node.input) > 4 or len(node.output) != 1:
        return None
    bits = named.group("bits")
    if attrs.get("bits") != int(bits) or not node.input[1].endswith(f"_Q{bits}"):
        return None
    path = module_of(named.group("node"), modules)
    if path is None:
        return None
    base = node.input[1][: -len(f"_Q{bits}")]
    tensors = tuple(node.input[1:])
    if any(t not in inits for t in tensors) or not _named_after(base, tensors, bits):
        return None
    layer = modules[path]
    w = layer.weight.detach().float().cpu().numpy()
    w = w if is_transposed(layer) else w.T  # the MatMul reads (in, out)
    if (attrs.get("K"), attrs.get("N")) != w.shape:
        return None
    matmul = onnx.helper.make_node(
        "MatMul", [node.input[0], base], list(node.output), name=named.group("node")
    )
    node.CopyFrom(matmul)
    return path, numpy_helper.from_array(np.ascontiguousarray(w), base), tensors


def _named_after(base: str, tensors: tuple[str, ...], bits: str) -> bool:
    """The quantizer's names: ``<weight>_Q<bits>``, ``<weight>_scales``, ``<weight>_zero_points``."""
    allowed = {base + s.format(bits=bits) for s in QUANTIZED_TENSORS}
    return all(t in allowed for t in tensors)
