"""What a proven quantized export computes, on both sides, so that parity can be judged by
arithmetic rather than by how much of the adapter survived:

* torch: the reference model with each quantized module's weight replaced by the float values the
  file's quantized tensors stand for (``dequantized_copy``; the file's own bytes, once the proof
  has shown they are the reference's quantization);
* onnxruntime: the same graph computing in float32 (``float_compute_graph``): ``MatMulNBits`` at
  accuracy level 0 (weights dequantized, activations kept float32, instead of level 4's int8
  activations per block), and ``quantize_dynamic``'s MatMulInteger chains as a MatMul of the float
  input with ``DequantizeLinear`` of the weight (instead of activations quantized per token).

The two then agree to float32 noise, with the tolerance ``verify.parity`` derives for any float32
export; what int8 activations add is measured (the file as written against its float-compute twin),
never assumed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from loraexport.core.values import ValueIndex
from loraexport.export.qformat import TIED, dynamic_dequantize, per_token_input, source_of
from loraexport.lora.inject import is_transposed, linear_shape
from loraexport.lora.layer import LoRALinear, WeightedLoRALinear
from loraexport.lora.views import set_tensor, shared_copy
from loraexport.verify.proof import Origins, held_by, roles
from loraexport.verify.tensorfile import TensorFile

DEQUANTIZED_REFERENCE = (
    "the reference with the dequantized weights the proof accepted, in PyTorch float32 (float64 for "
    "the noise floor), against the export computing in float32 (MatMulNBits at accuracy level 0, "
    "quantize_dynamic's products as MatMul of DequantizeLinear): the same weights on both sides"
)


def weight_index(model: nn.Module) -> ValueIndex:
    """Every linear layer's weight of ``model`` (``nn.Linear``, GPT-2's ``Conv1D``; the base layer
    of a LoRA branch), as the graph may store it, by value: as it is and transposed."""
    index = ValueIndex()
    for path, m in model.named_modules():
        if linear_shape(m) is None:
            continue
        w = m.weight.detach().float().cpu().numpy()
        index.add(w, path)
        index.add(w.T, path)
    return index


def float_origins(graph: Path | onnx.ModelProto, index: ValueIndex) -> Origins:
    """The 2-D float initializers of the float graph ``graph`` (a file, or loaded) that hold a
    linear layer's weight, by value (the exporters do not keep module names): {initializer:
    ((module, rows),)}. Several layers with equal weights are taken in turn."""
    model = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph))
    used: dict[tuple, int] = {}
    out: Origins = {}
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2:
            continue
        modules = index.find(onnx.numpy_helper.to_array(t))
        if modules:
            key = tuple(modules)
            i = min(used.get(key, 0), len(modules) - 1)
            used[key] = i + 1
            out[t.name] = ((modules[i], -1),)
    return out


def dequantized_rows(f: TensorFile, name: str, base: str, role, at: np.ndarray | None = None) -> torch.Tensor:
    """The float32 weight a quantized tensor of ``f`` stands for, as rows (N, K): one row per
    output, as ``nn.Linear`` holds it; ``at``: only these rows of a MatMulNBits-format tensor (an
    embedding's gathered rows, never the whole table). Computed with torch (threads, no transposed
    copy); equal bit for bit to ``export.qformat``'s reading (tested)."""
    fmt = role.fmt
    if fmt is None:  # quantize_dynamic: (K, N) per output channel
        w = dynamic_dequantize(f.array(name), f.array(base + "_scale"), f.array(base + "_zero_point"))
        return torch.from_numpy(np.ascontiguousarray(w.T))
    n = fmt.n if at is None else len(at)
    picked = (lambda a: a) if at is None else (lambda a: a[at])  # noqa: E731
    packed = torch.from_numpy(np.array(picked(f.array(name)), copy=True)).reshape(n, fmt.blocks, -1)
    codes = torch.stack((packed & 15, packed >> 4), dim=-1) if fmt.bits == 4 else packed
    scales = torch.from_numpy(np.array(picked(f.array(base + "_scales")), np.float32)).reshape(
        n, fmt.blocks, 1
    )
    rows = codes.reshape(n, fmt.blocks, fmt.block).to(torch.float32)
    del packed, codes
    rows.sub_(fmt.zero).mul_(scales)  # in place: one float32 copy of the weight, never three
    return rows.reshape(n, -1)[:, : fmt.k].contiguous()


def _split(rows: torch.Tensor, parts) -> dict[str, torch.Tensor]:
    """Each module's rows of a packed tensor; a ``TIED`` module gets the very tensor of the module
    before it (a tied embedding and LM head stay one tensor in the reference too)."""
    out, start, last = {}, 0, None
    for module, n in parts:
        if n == TIED and last is not None:
            out[module] = out[last]
            continue
        n = rows.shape[0] if n < 0 else n
        out[module] = rows[start : start + n]
        start, last = start + n, module
    return out


def dequantized_weights(path: Path, origins: Origins) -> dict[str, torch.Tensor]:
    """{module: the float weight (out, in) its quantized tensor in ``path`` stands for}; a packed
    tensor split by its modules' rows."""
    out: dict[str, torch.Tensor] = {}
    with TensorFile(path) as f:
        for name, role in roles(f.proto).items():
            base, parts = held_by(name, origins)
            if role.kind == "weight" and parts:
                out |= _split(dequantized_rows(f, name, base, role), parts)
    return out


def _linear(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """(parameter path prefix, the layer holding the weight) of module ``path``: a LoRA wrapper's
    base layer."""
    m = model.get_submodule(path)
    if isinstance(m, (LoRALinear, WeightedLoRALinear)):
        return f"{path}.base_layer", m.base_layer
    return path, m


def dequantized_copy(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` (shared, not copied) with each module of ``weights`` given its dequantized weight
    (out, in): as it is for ``nn.Linear``, transposed for ``Conv1D``; an embedding's table (V, H)
    as it is. A tied LM head gets its own tensor when the embedding stays float, as the graph's
    does; when the graph gathers the head's codes, both are given that one tensor (``_split``)."""
    out = shared_copy(model)
    made: dict = {}  # one value given to two modules stays one tensor (keyed by id: ``values`` keeps them)
    values = []
    for path, rows in weights.items():
        prefix, layer = _linear(out, path)
        value = rows.T.contiguous() if is_transposed(layer) else rows
        if tuple(value.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"{path}: dequantized weight {tuple(value.shape)} is not {tuple(layer.weight.shape)}"
            )
        values.append(value)
        set_tensor(out, f"{prefix}.weight", value, made)
    return out.eval()


# ---- the graph computing in float32 -------------------------------------------------------------
def float_compute_graph(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``proto`` computing its quantized products in float32 (see the module docstring); the
    number of products changed. The quantized weights themselves are not touched."""
    changed = 0
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
                    changed += 1
                    break
            else:
                n.attribute.append(helper.make_attribute("accuracy_level", 0))
                changed += 1
    return proto, changed + _dynamic_to_float(proto)


def _dynamic_to_float(proto: onnx.ModelProto) -> int:
    """Each ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul`` chain of ``quantize_dynamic``
    (or with the per-token quantizer ``export.dynamic.per_token_activations`` writes in its
    place: ``qformat.per_token_input``) as ``MatMul(x, DequantizeLinear(W_quantized, W_scale,
    W_zero_point, axis=1))``. The activation quantizer's own nodes are left, unused."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name for t in graph.initializer}
    drop: set[int] = set()
    replace: dict[int, list[onnx.NodeProto]] = {}
    for n in list(graph.node):
        if n.op_type != "MatMulInteger" or len(n.input) < 4 or n.input[1] not in inits:
            continue
        quant = producer.get(n.input[0])
        cast = (consumers.get(n.output[0]) or [None])[0]
        mul = (consumers.get(cast.output[0]) or [None])[0] if cast is not None else None
        if quant is not None and quant.op_type == "DynamicQuantizeLinear":  # per tensor
            x = quant.input[0]
        else:  # per token (int8-dynamic), or not a quantized activation
            x = per_token_input(n.input[0], producer)
        if x is None or cast is None or mul is None:
            continue
        src = source_of(n.input[1])
        if src is None or src[0] + "_scale" not in inits:
            continue
        w = f"{src[0]}.dequantized"
        replace[id(mul)] = [  # where the chain's result was made: after everything it reads
            helper.make_node("DequantizeLinear", [n.input[1], src[0] + "_scale", n.input[3]], [w],
                             name=f"{w}/DequantizeLinear", axis=1),
            helper.make_node("MatMul", [x, w], [mul.output[0]], name=f"{w}/MatMul"),
        ]  # fmt: skip
        drop.update((id(n), id(cast)))
    if replace:
        nodes = [m for n in graph.node if id(n) not in drop for m in replace.get(id(n), [n])]
        del graph.node[:]
        graph.node.extend(nodes)
    return len(replace)


def as_written(family, model: nn.Module, written, computed, samples: int, seed: int) -> dict:
    """The export as written (int8 activations, ``written``) against its float-compute twin
    (``computed``) on the parity cases: what the kernels' integer arithmetic adds, measured."""
    err, sq, n, agree, positions = 0.0, 0.0, 0, 0, 0
    for case in family.parity_cases(model, samples, seed):
        args = [case.inputs["input_ids"].numpy(), case.inputs["attention_mask"].numpy()]
        if "decoder_input_ids" in case.inputs:
            args.append(case.inputs["decoder_input_ids"].numpy())
        a, b = _main(written.forward_all(*args)), _main(computed.forward_all(*args))
        valid = case.valid.numpy() if a.shape[:2] == tuple(case.valid.shape) else np.ones(a.shape[:2], bool)
        diff = (a - b)[valid]
        err = max(err, float(np.abs(diff).max(initial=0.0)))
        sq, n = sq + float((diff**2).sum()), n + diff.size
        agree += int((a.argmax(-1) == b.argmax(-1))[valid].sum())
        positions += int(valid.sum())
    return {
        "what": "the export as written against itself computing in float32, on the parity cases",
        "max_abs_diff": err,
        "rms_diff": (sq / n) ** 0.5 if n else 0.0,
        "top1_agreement": agree / positions if positions else None,
    }


def _main(outputs: dict[str, np.ndarray]) -> np.ndarray:
    for name in ("decoder.logits", "model.logits"):
        if name in outputs:
            return outputs[name].astype(np.float64)
    return next(iter(outputs.values())).astype(np.float64)


class FileWeights:
    """A proven fused export's dequantized weights by module, read from the file when asked for
    (one quantized tensor held at a time): the layer-streamed reference's weights (``--stream``)."""

    def __init__(self, path: Path, origins: Origins) -> None:
        self.path, self._where = Path(path), {}
        self._file = TensorFile(self.path)
        self._roles = roles(self._file.proto)
        for name, role in self._roles.items():
            src = source_of(name)
            if role.kind != "weight" or src is None or src[0] not in origins:
                continue
            start, last = 0, 0
            for module, rows in origins[src[0]]:
                if rows == TIED:  # the rows of the module before it
                    self._where[module] = (name, src[0], start - last, last)
                    continue
                self._where[module] = (name, src[0], start, rows)
                start, last = start + rows, rows
        self._cached: tuple[str, np.ndarray] | None = None

    def __call__(self, module: str) -> torch.Tensor | None:
        """``module``'s weight (out, in) float32, or None when the export does not quantize it."""
        if module not in self._where:
            return None
        name, base, start, rows = self._where[module]
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # the previous tensor is freed before the next is read
            self._cached = (name, dequantized_rows(self._file, name, base, self._roles[name]))
        return self._cached[1][start : start + rows]

    def rows(self, module: str, ids: torch.Tensor) -> torch.Tensor | None:
        """Rows ``ids`` of ``module``'s weight (an embedding's table), float32, dequantized alone
        (never the whole table), or None when the export does not quantize it."""
        if module not in self._where:
            return None
        name, base, start, _ = self._where[module]
        return dequantized_rows(self._file, name, base, self._roles[name], (start + ids).numpy())

    def close(self) -> None:
        self._cached = None
        self._file.close()
