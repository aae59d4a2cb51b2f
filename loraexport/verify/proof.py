"""The weight-level proof of a quantized export: the file holds exactly what the export of the
reference makes.

The reference weights (the merge W0 + Σ w·s·B·A computed in float64 and rounded once, or the base
with the adapter kept) are exported again the way ``loraexport.json`` says the file was (exporter,
opset, graph, precision, which branches stay float32), with the same deterministic quantizer, and
compared with the file (``compare``):

* every node (op, domain, inputs, attributes, constants; by the tensors it computes: names and
  order of nodes are free), the graph's inputs and outputs and its opsets;
* every initializer, both ways: one the file holds that the reference does not make is
  *unclaimed*, one the reference makes that the file lacks is *missing*; each is bit-exact.
  A quantized weight whose codes differ by one step on at most ``MAX_STEP_SHARE`` of its elements,
  with identical scales, is accepted and reported (a rounding tie resolved otherwise by another
  build of the quantizer); anything else fails, naming the tensor and the modules it holds;
* each quantized weight holds the weights of known modules (``origins``), and no module is held by
  two: the map from tensors to modules is checked both ways.

A fused graph is compared as it is written (``CompareSink``: one tensor at a time, in bounded
memory), any other graph once it has been exported into a scratch folder (``stages.prove``).
No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from loraexport.export.qformat import NBits, nbits_codes, source_of
from loraexport.verify.tensorfile import TensorFile, tensor_array

# Quantized codes that may differ by one step, as a share of a weight's elements (identical
# scales only): ties in round-to-nearest land on either side when a quantizer's build divides
# by the scale instead of multiplying by its reciprocal (one float32 ulp); a tampered or wrong
# weight moves most codes, or codes by more than one step.
MAX_STEP_SHARE = 1e-4
MAX_MESSAGES = 12  # failures listed per file; the rest are counted
QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "GatherBlockQuantized", "DequantizeLinear")

Origins = dict[str, tuple[tuple[str, int], ...]]  # float weight name -> ((module, rows), ...)


@dataclass
class FileProof:
    """The proof of one file of an export (a graph, or an ``.onnx_adapter``)."""

    file: str
    nodes: int = 0
    tensors: int = 0  # tensors proven (compared and equal)
    quantized: int = 0  # of which quantized weights (their scales and zero points not counted)
    modules: int = 0  # modules whose weights the quantized tensors hold, each by exactly one
    bytes: int = 0
    off_by_step: list[dict[str, Any]] = field(default_factory=list)  # accepted: {tensor, codes, of}
    failures: list[str] = field(default_factory=list)
    more_failures: int = 0

    def fail(self, message: str) -> None:
        if len(self.failures) < MAX_MESSAGES:
            self.failures.append(message)
        else:
            self.more_failures += 1

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Proof:
    """Every file's proof; ``method`` says how the expected content was made."""

    method: str
    files: list[FileProof] = field(default_factory=list)
    seconds: float = 0.0
    claims: list[str] = field(default_factory=list)  # loraexport.json claims found false

    @property
    def passed(self) -> bool:
        return not self.claims and all(f.passed for f in self.files)

    @property
    def failures(self) -> list[str]:
        out = list(self.claims)
        for f in self.files:
            out += [f"{f.file}: {m}" for m in f.failures]
            if f.more_failures:
                out.append(f"{f.file}: {f.more_failures} more differences")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "proof",
            "passed": self.passed,
            "method": self.method,
            "seconds": self.seconds,
            "tensors": sum(f.tensors for f in self.files),
            "quantized_tensors": sum(f.quantized for f in self.files),
            "modules": sum(f.modules for f in self.files),
            "off_by_one_step": [dict(o, file=f.file) for f in self.files for o in f.off_by_step],
            "files": [
                {k: getattr(f, k) for k in ("file", "nodes", "tensors", "quantized", "modules", "bytes")}
                | {"passed": f.passed}
                for f in self.files
            ],
            "failures": self.failures,
        }


# ---- roles: what each initializer of a graph is for ------------------------------------------------
@dataclass(frozen=True)
class Role:
    kind: str  # "weight" | "scales" | "zero_points"
    op: str
    node: str  # the first output of the node that reads it
    fmt: NBits | None = None  # MatMulNBits weights


def roles(proto: onnx.ModelProto) -> dict[str, Role]:
    """The quantized initializers of ``proto`` (weights, scales, zero points) by name."""
    out: dict[str, Role] = {}
    dims = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type not in QUANTIZED_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        where = n.output[0] if n.output else n.name
        if n.op_type == "MatMulNBits":
            fmt = NBits(int(attrs.get("K", 0)), int(attrs.get("N", 0)), int(attrs.get("bits", 4)),
                        int(attrs.get("block_size", 0)))  # fmt: skip
            for i, kind in ((1, "weight"), (2, "scales"), (3, "zero_points")):
                if len(n.input) > i and n.input[i]:
                    out[n.input[i]] = Role(kind, n.op_type, where, fmt if kind == "weight" else None)
        elif n.op_type == "MatMulInteger" and len(n.input) > 1:
            out[n.input[1]] = Role("weight", n.op_type, where)
            if len(n.input) > 3 and n.input[3]:
                out[n.input[3]] = Role("zero_points", n.op_type, where)
        elif n.op_type == "GatherBlockQuantized" and n.input and n.input[0] in dims:
            shape = dims[n.input[0]]  # (V, blocks, block·bits/8): a MatMulNBits weight's layout
            bits = int(attrs.get("bits", 4))
            if len(shape) == 3 and n.input[0] not in out:  # a MatMulNBits reading it says the same
                fmt = NBits(shape[1] * shape[2] * 8 // bits, shape[0], bits, int(attrs.get("block_size", 0)))
                out[n.input[0]] = Role("weight", n.op_type, where, fmt)
        elif n.op_type == "DequantizeLinear":
            for i, kind in ((0, "weight"), (1, "scales")):
                if len(n.input) > i and n.input[i]:
                    out[n.input[i]] = Role(kind, n.op_type, where)
    return out


def held_by(name: str, origins: Origins) -> tuple[str, tuple[tuple[str, int], ...]]:
    """(the float weight a quantized tensor was made from, the modules it holds: () if unknown);
    a GPT-2 weight the quantizer transposed first (``<name>.T``) holds what ``<name>`` held."""
    src = source_of(name)
    base = src[0] if src else name
    parts = origins.get(base) or (origins.get(base[:-2]) if base.endswith(".T") else None)
    return base, tuple(parts or ())


def describe_tensor(name: str, origins: Origins) -> str:
    """``'name'``, with the modules whose weights it holds when known."""
    parts = held_by(name, origins)[1] or origins.get(name) or ()
    mods = ", ".join(m for m, _ in parts[:3]) + (" …" if len(parts) > 3 else "")
    return f"tensor {name!r}" + (f" ({mods})" if mods else "")


# ---- comparing ----------------------------------------------------------------------------------
def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            t = a.t
            value: Any = (
                t.data_type,
                tuple(t.dims),
                tensor_array(t).tobytes() if not t.external_data else None,
            )
        elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            value = a.SerializeToString(deterministic=True)
        else:
            value = onnx.helper.get_attribute_value(a)
            value = value.tolist() if isinstance(value, np.ndarray) else value
        out[a.name] = value
    return out


def _nodes(proto: onnx.ModelProto, fp: FileProof) -> dict[tuple[str, ...], onnx.NodeProto]:
    out: dict[tuple[str, ...], onnx.NodeProto] = {}
    for n in proto.graph.node:
        key = tuple(n.output)
        if key in out:
            fp.fail(f"two nodes compute {key[0]!r}")
        out[key] = n
    return out


def compare_graph(expected: onnx.ModelProto, actual: onnx.ModelProto, fp: FileProof) -> None:
    """Opsets, graph inputs and outputs, and every node of ``actual`` against ``expected``."""
    if {(o.domain, o.version) for o in expected.opset_import} != {
        (o.domain, o.version) for o in actual.opset_import
    }:
        fp.fail("opsets differ from the export the reference makes")
    for what in ("input", "output"):
        want = [(v.name, v.type.SerializeToString(deterministic=True)) for v in getattr(expected.graph, what)]
        got = [(v.name, v.type.SerializeToString(deterministic=True)) for v in getattr(actual.graph, what)]
        if want != got:
            i = next(
                (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                min(len(want), len(got)),
            )
            mine = want[i][0] if i < len(want) else "nothing"
            theirs = got[i][0] if i < len(got) else "nothing"
            fp.fail(f"graph {what} {i} is {theirs!r} in the file, {mine!r} (or its type) in the reference's")
    want, got = _nodes(expected, fp), _nodes(actual, fp)
    for key, node in want.items():
        other = got.get(key)
        if other is None:
            fp.fail(f"no node computes {key[0]!r} ({node.op_type})")
            continue
        what = f"node computing {key[0]!r} ({node.op_type})"
        if (other.op_type, other.domain) != (node.op_type, node.domain):
            fp.fail(f"{what} is {other.op_type} in the file")
        elif list(other.input) != list(node.input):
            fp.fail(f"{what} reads {list(other.input)[:4]}, not {list(node.input)[:4]}")
        elif _attrs(other) != _attrs(node):
            mine, theirs = _attrs(node), _attrs(other)
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            fp.fail(f"{what}: attribute {diff[0]} differs")
    for key, node in got.items():
        if key not in want:
            fp.fail(f"node computing {key[0]!r} ({node.op_type}) is not in the export the reference makes")
    fp.nodes = len(want)


def compare_tensor(
    name: str, want: np.ndarray, got: np.ndarray, role: Role | None, fp: FileProof, origins: Origins,
    scales_equal: Callable[[], bool] = lambda: True,
) -> None:  # fmt: skip
    """One initializer of the file (``got``) against what the reference makes (``want``)."""
    label = describe_tensor(name, origins)
    if want.dtype != got.dtype or want.shape != got.shape:
        fp.fail(
            f"{label} is {got.dtype}{list(got.shape)}, the reference makes {want.dtype}{list(want.shape)}"
        )
        return
    if want.tobytes() == got.tobytes():
        fp.tensors += 1
        fp.bytes += want.nbytes
        fp.quantized += role is not None and role.kind == "weight"
        return
    if role is not None and role.kind == "weight" and role.fmt is not None:
        step = np.abs(nbits_codes(got, role.fmt) - nbits_codes(want, role.fmt))
    elif role is not None and role.kind == "weight" and want.dtype in (np.int8, np.uint8):
        step = np.abs(got.astype(np.int16) - want.astype(np.int16))
    else:
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64)) if want.dtype.kind == "f" else None
        detail = f"max difference {float(diff.max()):.3g}" if diff is not None else "its values differ"
        fp.fail(f"{label} differs from the reference's: {detail} (of max |value| "
                f"{float(np.abs(want.astype(np.float64)).max(initial=0.0)):.3g})")  # fmt: skip
        return
    off = int((step > 0).sum())
    if step.max() == 1 and off <= MAX_STEP_SHARE * step.size and scales_equal():
        fp.tensors += 1
        fp.bytes += want.nbytes
        fp.quantized += 1
        fp.off_by_step.append({"tensor": name, "codes": off, "of": int(step.size)})
        return
    fp.fail(f"{label} differs from the reference's quantized weights: {off} of {step.size} codes, "
            f"up to {int(step.max())} steps")  # fmt: skip


def compare_initializers(
    expected: onnx.ModelProto,
    read_expected: Callable[[str], np.ndarray],
    actual: TensorFile,
    fp: FileProof,
    origins: Origins,
    done: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Every initializer both ways; those in ``done`` were compared as they were made."""
    want = {t.name for t in expected.graph.initializer}
    for name in actual.duplicates:
        fp.fail(f"tensor {name!r} is stored twice")
    for name in sorted(set(actual.initializers) - want):
        fp.fail(f"{describe_tensor(name, origins)} is unclaimed: the reference export makes no such tensor")
    for name in sorted(want - set(actual.initializers)):
        fp.fail(f"{describe_tensor(name, origins)} is missing from the file")
    kinds = roles(expected)
    for name in [t.name for t in expected.graph.initializer]:
        if name in done or name not in actual.initializers:
            continue
        got, want_t = actual.array(name), read_expected(name)
        role = kinds.get(name)
        compare_tensor(
            name, want_t, got, role, fp, origins, lambda n=name: _scales_equal(n, read_expected, actual)
        )


def _scales_equal(weight: str, read_expected, actual: TensorFile) -> bool:
    """The scales beside a quantized weight are identical in the file and the reference."""
    src = source_of(weight)
    if src is None:
        return False
    for suffix in ("_scales", "_scale"):
        name = src[0] + suffix
        if name in actual.initializers:
            try:
                return read_expected(name).tobytes() == actual.array(name).tobytes()
            except KeyError:
                return False
    return False


def check_claims(expected: onnx.ModelProto, origins: Origins, fp: FileProof) -> None:
    """Both ways: each quantized weight holds the weights of modules, no module is held twice, and
    no module's weight is left a float32 product in a quantized graph (the quantizer skipped it)."""
    held: dict[str, str] = {}
    for name, role in roles(expected).items():
        if role.kind != "weight":
            continue
        parts = held_by(name, origins)[1]
        if not parts:
            fp.fail(f"tensor {name!r} ({role.op} computing {role.node!r}) holds no module's weights")
            continue
        for module, _ in parts:
            if module in held and held[module] != name:
                fp.fail(f"module {module} is held by {held[module]!r} and {name!r}")
            held[module] = name
    inits = {t.name for t in expected.graph.initializer}
    for n in expected.graph.node:
        weight = n.input[1] if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 else None
        for module, _ in origins.get(weight, ()) if weight in inits else ():
            if module not in held:
                fp.fail(f"module {module} stays a float32 {n.op_type} in a quantized graph ({weight!r})")
    fp.modules = len(held)


class CompareSink:
    """Where ``export.fused`` puts each large initializer as it makes it (``graph_writer.Sink``'s
    interface): compared with the file's tensor of that name at once, nothing kept."""

    def __init__(self, actual: TensorFile, fp: FileProof, origins: Origins) -> None:
        self.actual, self.fp, self.origins = actual, fp, origins
        self.done: set[str] = set()
        self._roles = roles(actual.proto)  # for the detail of a difference only

    def put(self, name: str, data: memoryview, element: int, dims: tuple[int, ...]) -> onnx.TensorProto:
        self.done.add(name)
        actual = self.actual.initializers.get(name)
        if actual is not None:
            want = np.frombuffer(data, dtype=onnx.helper.tensor_dtype_to_np_dtype(element)).reshape(dims)
            if (
                actual.data_type == element
                and tuple(actual.dims) == tuple(dims)
                and self.actual.same_bytes(name, data)
            ):
                self.fp.tensors += 1  # equal, compared a block at a time: nothing the tensor's size held
                self.fp.bytes += want.nbytes
                self.fp.quantized += self._roles.get(name) is not None and self._roles[name].kind == "weight"
            else:  # the detail of a difference (the file's tensor read whole)
                compare_tensor(
                    name, want, self.actual.array(name), self._roles.get(name), self.fp, self.origins
                )
        return onnx.TensorProto(name=name, data_type=element, dims=list(dims))

    def close(self) -> None:
        pass
