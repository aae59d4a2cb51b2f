"""``--optimize``: graphs that do less and run fused, for Hugging Face decoders.

- Llama, Mistral, Qwen2: the graph is written by loraexport itself (``export.fused``):
  onnxruntime's fused operators (``GroupQueryAttention`` with a key/value buffer updated in
  place, ``RotaryEmbedding``, ``SkipSimplifiedLayerNormalization``), packed q/k/v and
  gate/up products, and the LM head on the last position only.
- GPT-2: the torch.onnx export, with the LM head on the last position only (its attention
  keeps the exporter's ops: onnxruntime has no fused CPU kernel for it that takes our cache).

A graph that computes the last position's logits declares that axis as the static 1
(onnxruntime-genai treats the logits as pruned only then). Parity still compares the logits
of every position: ``runtime.OnnxModel.forward_all`` feeds such a graph one token at a time
through its cache, the path generation takes.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx
from torch import nn

from loraexport.artifact.schema import BUILDER
from loraexport.core.enums import Precision
from loraexport.errors import ExportError
from loraexport.export.onnx import ExportResult, export_graphs, opset_written
from loraexport.models.spec import GraphSpec
from loraexport.models.types import FUSED_TYPES


def optimized_export(
    model: nn.Module,
    specs: list[GraphSpec],
    out_dir: Path,
    opset: int,
    exporter: str,
    precision: Precision | None = None,
    origins: dict | None = None,
    block: int | None = None,
) -> ExportResult:
    """--optimize: the fused graph for Llama, Mistral and Qwen2 (written quantized when
    ``precision`` is int8/int4; its inputs and outputs named as ``specs``'); GPT-2's torch.onnx
    export of ``specs`` (the family's last-position graph; float32, quantized afterwards).
    ``origins``: filled by the fused writer with the modules each weight holds
    (``export.graph_writer.Graph.origins``)."""
    if model.config.model_type in FUSED_TYPES:
        io = (specs[0].input_names, specs[0].output_names)
        return fused_export(model, out_dir, io, precision, origins, block)
    return last_position_export(specs, out_dir, opset, exporter)


def fused_export(
    model: nn.Module,
    out_dir: Path,
    graph_io: tuple[list[str], list[str]],
    precision: Precision | None = None,
    origins: dict | None = None,
    block: int | None = None,
) -> ExportResult:
    """``out_dir/model.onnx`` written by ``export.fused`` (``graph_io``: its input and output
    names, those of the plain export); int8/int4 ``precision``: quantized as it is written, as the
    streamed export does (``optimized["quantized"]`` then says so)."""
    from loraexport.export.fused import write_fused_decoder
    from loraexport.export.fused_source import ModuleSource

    t0 = time.perf_counter()
    nbits = precision if precision in (Precision.INT8, Precision.INT4) else Precision.FLOAT32
    info = write_fused_decoder(
        ModuleSource(model), out_dir / "model.onnx", nbits, origins=origins, block=block
    )
    graph = "written by loraexport (fused onnxruntime operators)"
    return fused_result(out_dir, graph_io, {"graph": graph, **info}, t0)


def fused_result(
    out_dir: Path, graph_io: tuple[list[str], list[str]], optimized: dict, t0: float
) -> ExportResult:
    """The ``ExportResult`` of a fused graph just written to ``out_dir/model.onnx`` (checked by
    onnx.checker here), from memory (``fused_export``) or streamed (``stages.sources``)."""
    path = out_dir / "model.onnx"
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} (fused) fails onnx.checker: {e}") from e
    result = ExportResult(opset=opset_written(path) or 0, exporter=BUILDER)
    result.files = [f for f in ("model.onnx", "model.onnx.data") if (out_dir / f).is_file()]
    result.inputs["model"], result.outputs["model"] = list(graph_io[0]), list(graph_io[1])
    result.layouts["model"] = {"logits": "last", "kv_cache": "shared-buffer"}
    result.optimized = optimized
    result.seconds = time.perf_counter() - t0
    result.bytes = sum((out_dir / f).stat().st_size for f in result.files)
    return result


def last_position_export(specs: list[GraphSpec], out_dir: Path, opset: int, exporter: str) -> ExportResult:
    """The torch.onnx export of ``specs`` (whose ``model`` graph computes the last position's
    logits), with that axis declared the static 1."""
    result = export_graphs(specs, out_dir, opset, exporter)
    path = out_dir / "model.onnx"
    pin_last_position(path)
    result.layouts["model"] = {"logits": "last", "kv_cache": "growing"}
    result.optimized = {
        "graph": f"torch.onnx ({exporter}), LM head on the last position only",
        "logits": "last position",
        "kv_cache": "growing (present = past + new)",
    }
    result.bytes = sum((out_dir / f).stat().st_size for f in result.files)
    return result


def pin_last_position(path: Path) -> None:
    """Declare dim 1 of output ``logits`` the static 1 (the exporter leaves it symbolic). With
    external data, only the graph is rewritten: the weights stay where they are."""
    model = onnx.load(str(path), load_external_data=False)
    out = next((o for o in model.graph.output if o.name == "logits"), None)
    if out is None or len(out.type.tensor_type.shape.dim) != 3:
        raise ExportError(f"{path.name} has no output 'logits' of rank 3")
    dim = out.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = 1
    onnx.save_model(model, str(path))
