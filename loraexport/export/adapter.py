"""``--mode adapter``: one graph, many adapters.

The LoRA branches stay in the graph, and each factor is a named graph input with a default
initializer of zeros (``<module>.lora_A.weight``, ``<module>.lora_B.weight``, the names
onnxruntime-genai's builder gives them): a run with no adapter active is the base model, and an
onnxruntime adapter file (``.onnx_adapter``, written by ``onnxruntime.AdapterFormat``) holding
tensors of those names is activated per run (``RunOptions.add_active_adapter``, or
onnxruntime-genai's ``Adapters.set_active_adapter``).

How the inputs are made: the model is exported unmerged with *probe* factors (random values of
rank ``R``, scaling 1), then each initializer whose value is a probe (as stored, or transposed)
becomes the input, with its shape as the exporter stored it (``transposed`` says which). The
exporters are not asked to keep names, so nothing depends on how they name constants.

An adapter file holds, per module, A (r × in) and s·B (out × r), the scaling s of that module
(``alpha/r``, rsLoRA's ``alpha/√r``, ``rank_pattern``/``alpha_pattern``) folded into B in
float64, both zero-padded to rank ``R``, in the orientation the graph stores. No torch here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from loraexport.core.enums import MAX_LORA_RANK
from loraexport.errors import AdapterMismatchError, ExportError

PROBE_SEED = 20261130
ADAPTER_SUFFIX = ".onnx_adapter"


def input_name(module: str, factor: str) -> str:
    """The graph input of ``module``'s factor ``A`` or ``B``."""
    return f"{module}.lora_{factor}.weight"


def probe_factors(shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Distinct random factors per module: A (rank × in), B (out × rank), float32."""
    rng = np.random.default_rng(PROBE_SEED)
    return {
        m: (
            rng.standard_normal((rank, i)).astype(np.float32),
            rng.standard_normal((o, rank)).astype(np.float32),
        )
        for m, (i, o) in sorted(shapes.items())
    }


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def expose_factors(path: Path, probes: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict]:
    """Turn the probe initializers of the ONNX file ``path`` into graph inputs with zero
    defaults (in place); return ``{input name: {module, factor, shape, transposed}}`` for the
    probes found. Several initializers holding one probe become one input."""
    wanted: dict[tuple[tuple[int, ...], str], tuple[str, str, bool]] = {}
    for module, (a, b) in probes.items():
        for factor, value in (("A", a), ("B", b)):
            wanted[(value.shape, _digest(value))] = (module, factor, False)
            wanted[(value.T.shape, _digest(value.T))] = (module, factor, True)
    shapes = {s for s, _ in wanted}
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    renamed: dict[str, str] = {}
    found: dict[str, dict] = {}
    kept = []
    for init in graph.initializer:
        hit = None
        if init.data_type == onnx.TensorProto.FLOAT and tuple(init.dims) in shapes:
            value = numpy_helper.to_array(init, base_dir=str(path.parent))
            hit = wanted.get((value.shape, _digest(value)))
        if hit is None:
            kept.append(init)
            continue
        module, factor, transposed = hit
        name = input_name(module, factor)
        renamed[init.name] = name
        if name in found:  # a second copy of the same probe: its uses read the one input
            if found[name]["transposed"] != transposed:
                raise ExportError(
                    f"--mode adapter: {path.name} holds {module}'s LoRA {factor} both as it is and "
                    "transposed; one graph input cannot stand for both"
                )
            continue
        found[name] = {"module": module, "factor": factor, "shape": list(init.dims), "transposed": transposed}
        kept.append(numpy_helper.from_array(np.zeros(tuple(init.dims), np.float32), name))
        graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(init.dims)))
    if not found:
        return {}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    data = path.with_name(path.name + ".data")
    if data.is_file():  # a large model: the zero defaults join its external data (protobuf ≤ 2 GiB)
        _append_external(model, data, set(found))
    onnx.save(model, str(path))
    return found


def _append_external(model: onnx.ModelProto, data: Path, names: set[str]) -> None:
    """Move the initializers ``names`` to the end of the external data file ``data``. The
    probes' own bytes stay in it, unused (as much again as the zeros: r × (in + out) floats
    per module)."""
    with open(data, "ab") as f:
        for init in model.graph.initializer:
            if init.name not in names:
                continue
            f.write(b"\0" * (-f.tell() % 4096))  # aligned, as onnx writes them
            offset, raw = f.tell(), init.raw_data
            f.write(raw)
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value


def check_exposed(found: dict[str, dict], probes: dict) -> None:
    """Every probe factor became an input (else the exporter folded it into something else)."""
    for module in probes:
        for factor in "AB":
            if input_name(module, factor) not in found:
                raise ExportError(
                    f"--mode adapter: the exported graph has no constant holding {module}'s LoRA "
                    f"{factor} (the exporter folded it); this model cannot take adapters per request"
                )


@dataclass(frozen=True)
class GraphLora:
    """What an adapter-mode graph accepts: its rank and its inputs (``loraexport.json``)."""

    rank: int
    inputs: dict[str, dict]

    @classmethod
    def from_meta(cls, meta: dict, where: str) -> GraphLora:
        """From ``loraexport.json`` (untrusted: every field is checked, one line per problem)."""
        lora = meta.get("lora_inputs")
        if meta.get("mode") != "adapter" or not isinstance(lora, dict):
            raise AdapterMismatchError(
                f"{where} is not an adapter-mode export (export it with --mode adapter)"
            )
        rank, inputs = lora.get("rank"), lora.get("inputs")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
            raise AdapterMismatchError(
                f"{where}: lora_inputs.rank must be an integer from 1 to {MAX_LORA_RANK}"
            )
        if not isinstance(inputs, dict) or not inputs:
            raise AdapterMismatchError(f"{where}: lora_inputs.inputs must be a non-empty object")
        factors: dict[str, dict[str, dict]] = {}
        for name, spec in inputs.items():
            if not _valid_spec(name, spec, rank):
                raise AdapterMismatchError(
                    f"{where}: lora_inputs.inputs.{str(name)[:200]} is not a LoRA input"
                )
            factors.setdefault(spec["module"], {})[spec["factor"]] = spec
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                have = next(iter(pair))
                raise AdapterMismatchError(
                    f"{where}: lora_inputs has {module[:200]}'s lora_{have} but not its other factor"
                )
            # the rank on its axis: A is (rank, in), or (in, rank) transposed; B (out, rank) or (rank, out)
            a_rank = pair["A"]["shape"][1 if pair["A"]["transposed"] else 0]
            b_rank = pair["B"]["shape"][0 if pair["B"]["transposed"] else 1]
            if a_rank != rank or b_rank != rank:
                raise AdapterMismatchError(f"{where}: lora_inputs of {module[:200]} are not of rank {rank}")
        return cls(rank, dict(inputs))

    @property
    def modules(self) -> set[str]:
        return {v["module"] for v in self.inputs.values()}


def _valid_spec(name: object, spec: object, rank: int) -> bool:
    """One ``lora_inputs.inputs`` entry: its name is its module's factor, a 2-D shape holding
    the rank, a bool for the orientation."""
    if not isinstance(spec, dict) or not isinstance(name, str):
        return False
    module, factor, shape = spec.get("module"), spec.get("factor"), spec.get("shape")
    return (
        isinstance(module, str)
        and factor in ("A", "B")
        and name == input_name(module, factor)
        and isinstance(spec.get("transposed"), bool)
        and isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 2**31 for d in shape)
        and rank in shape
    )


def adapter_tensors(
    weights: dict[str, tuple[np.ndarray, np.ndarray]], scaling: dict[str, float], graph: GraphLora
) -> dict[str, np.ndarray]:
    """The adapter file's tensors for ``weights`` (module → (A r×in, B out×r)), checked against
    ``graph`` before anything is written: every module must be one the graph adapts, with its
    shapes, at a rank the graph holds. Modules the graph adapts and the adapter does not stay
    at their zero defaults."""
    out: dict[str, np.ndarray] = {}
    for module in sorted(weights):
        a, b = (np.asarray(t, np.float64) for t in weights[module])
        if input_name(module, "A") not in graph.inputs:
            raise AdapterMismatchError(
                f"{module}: the graph has no LoRA input for this module "
                f"(it adapts {len(graph.modules)} modules, e.g. {min(graph.modules)})"
            )
        r = a.shape[0]
        if r > graph.rank:
            raise AdapterMismatchError(
                f"{module}: rank {r} exceeds the graph's rank {graph.rank} (export with --max-rank {r})"
            )
        padded_a = np.zeros((graph.rank, a.shape[1]))
        padded_b = np.zeros((b.shape[0], graph.rank))
        padded_a[:r], padded_b[:, :r] = a, scaling[module] * b
        for factor, value in (("A", padded_a), ("B", padded_b)):
            spec = graph.inputs[input_name(module, factor)]
            stored = value.T if spec["transposed"] else value
            if list(stored.shape) != list(spec["shape"]):
                raise AdapterMismatchError(
                    f"{module}: lora_{factor} is {tuple(value.shape)} at the graph's rank; the graph "
                    f"takes {tuple(spec['shape'])}{' transposed' if spec['transposed'] else ''} "
                    "(an adapter for another base?)"
                )
            out[input_name(module, factor)] = np.ascontiguousarray(stored, np.float32)
    return out


def write_adapter_file(tensors: dict[str, np.ndarray], path: Path) -> None:
    """An onnxruntime adapter file holding ``tensors`` (``onnxruntime.AdapterFormat``)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fmt.export_adapter(str(path))
