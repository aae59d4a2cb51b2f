"""The export stage: a model (merged, unmerged or the base) to ONNX in an output folder, with
the weights stored in the precision asked for and ``loraexport.json`` describing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from loraexport.dtypes import torch_dtype
from loraexport.enums import ExportMode, Precision, half_precision, quantization
from loraexport.errors import ExportError, InvalidInputError, ModelFormatError
from loraexport.export.fused_config import check_config
from loraexport.export.half import store_weights_half
from loraexport.export.onnx import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_BYTES,
    ExportResult,
    check_opset,
    export_graphs,
)
from loraexport.export.optimize import FUSED_TYPES, LAST_POSITION_TYPES
from loraexport.export.quantize import lora_matmuls, quantization_description, quantize_graph
from loraexport.io import read_json
from loraexport.models.base import ModelFamily
from loraexport.models.registry import detect_family
from loraexport.output import write_output
from loraexport.provenance import export_description
from loraexport.stages.adapter_mode import check_adapter_mode, describe_adapters, probe_model
from loraexport.stages.extras import write_extras
from loraexport.stages.inputs import (
    Log,
    adapter_provenance,
    as_list,
    check_dora_mode,
    load_inputs,
    model_provenance,
    plan,
    quiet,
)
from loraexport.stages.merge import merged_model, unmerged_model
from loraexport.stages.streamed import wants_stream


def export_model(
    family: ModelFamily,
    model: nn.Module,
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
    exporter: str | None = None,
    weights_dtype: Precision | str | None = None,
    keep: list[np.ndarray] | None = None,
    optimize: bool = False,
) -> ExportResult:
    """Export ``model``'s graphs into ``out_dir`` (which exists); ``optimize``: the family's
    optimized graph (``export.optimize``; ``check_optimize`` said the family has one).

    ``weights_dtype`` float16/bfloat16: store the weights in it (``export.half``); ``model``
    must already hold weights rounded to it, so nothing is lost in the file. int8/int4:
    quantize the graph's MatMuls (``export.quantize``), all but those whose weight is one of
    ``keep`` (the LoRA factors of an unmerged model: the adapter stays in float32).
    """
    if optimize:
        if family.optimized_export is None:
            raise ExportError(f"--optimize: the {family.name} family has no optimized graph")
        result = family.optimized_export(model, out_dir, opset, exporter or family.exporter)
    else:
        result = export_graphs(family.graph_specs(model), out_dir, opset, exporter or family.exporter)
    half, quant = half_precision(weights_dtype), quantization(weights_dtype)
    if half:
        for g in result.inputs:
            store_weights_half(out_dir / f"{g}.onnx", half.value, EXTERNAL_DATA_BYTES)
    if quant:
        for g in result.inputs:
            path = out_dir / f"{g}.onnx"
            kept = lora_matmuls(path, keep) if keep else []
            if keep and not kept:
                raise ExportError(f"{path.name}: the LoRA branch's MatMuls were not found; cannot keep them")
            result.exporter_log += quantize_graph(path, quant, kept)
    if half or quant:
        names = [f for g in result.inputs for f in (f"{g}.onnx", f"{g}.onnx.data")]
        result.files = [f for f in names if (out_dir / f).is_file()]
        result.bytes = sum((out_dir / f).stat().st_size for f in result.files)
    return result


def describe(
    family: ModelFamily, model: nn.Module, result: ExportResult, precision: Precision | None, mode: ExportMode
) -> dict:
    """``loraexport.json``'s description of an export (``provenance``); a quantized one says how,
    and whether the adapter was merged before quantizing or kept beside the quantized base."""
    out = export_description(family, model, result, (precision or Precision.FLOAT32).value, mode.value)
    if precision is not None and precision.is_quantized:
        out["quantization"] = quantization_description(
            precision, "kept in float32" if mode in (ExportMode.UNMERGED, ExportMode.ADAPTER) else "merged"
        )
    return out


def check_optimize(model_dir: str | Path, optimize: bool) -> None:
    """Refuse --optimize (``InvalidInputError``, before any work) for a model it does not apply to."""
    if not optimize:
        return
    family = detect_family(model_dir)
    config = read_json(Path(model_dir) / "config.json", ModelFormatError)
    if not family.optimizes(config):
        raise InvalidInputError(
            f"--optimize applies to Hugging Face decoders ({', '.join(optimize_types())}); "
            f"{model_dir} is a {family.name} model of type {config.get('model_type')!r}"
        )
    if config.get("model_type") in FUSED_TYPES:
        try:
            check_config(config)
        except ExportError as e:
            raise InvalidInputError(f"--optimize: {model_dir}/config.json: {e}") from e


def check_quantize(
    quantize: str | None, keep_adapter: bool, half: Precision | None, adapters: list
) -> Precision | None:
    """The quantization asked for, or None; refused with --dtype, and --keep-adapter without one."""
    quant = quantization(quantize) if quantize is not None else None
    if quantize is not None and quant is None:
        raise InvalidInputError(f"--quantize must be one of {', '.join(Precision.choices('quantized'))}")
    if quant and half:
        raise InvalidInputError("--quantize and --dtype both set how weights are stored: give one")
    if keep_adapter and not quant:
        raise InvalidInputError("--keep-adapter keeps the adapter beside a quantized base: give --quantize")
    if keep_adapter and not adapters:
        raise InvalidInputError("--keep-adapter needs an --adapter to keep")
    return quant


def optimize_types() -> tuple[str, ...]:
    return FUSED_TYPES + LAST_POSITION_TYPES


def lora_factors(loaded) -> list[np.ndarray]:
    """Every LoRA A and B of the loaded adapters, as the graph holds them (float32)."""
    return [t.detach().float().numpy() for a in loaded.adapters for pair in a.weights.values() for t in pair]


def export(
    model_dir: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | list[str | Path] | None = None,
    weights: list[float] | None = None,
    mode: str = "merged",
    opset: int = DEFAULT_OPSET,
    exporter: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    dtype: str | None = None,
    quantize: str | None = None,
    keep_adapter: bool = False,
    optimize: bool = False,
    max_rank: int | None = None,
    log: Log = quiet,
    stream: bool | None = None,
    show_progress: bool = False,
) -> ExportResult:
    """Export a model directory (optionally with adapters, ``merged`` or ``unmerged``) to ONNX.

    ``dtype`` float16/bfloat16: the merged (or base) weights are rounded to it once and stored
    in it; the graph computes in float32. ``quantize`` int8/int4: the graph's MatMuls are
    quantized (``export.quantize``); with ``keep_adapter`` only the base's, the LoRA branches
    staying in float32 beside them (an unmerged graph). ``optimize``: fused, last-position
    graphs for Hugging Face decoders (``export.optimize``). ``stream``: True writes the fused
    graph from the checkpoint tensor by tensor, in bounded memory (``stages.streamed``); None (auto)
    does so when the model would not fit in memory; False never.
    """
    asked = ExportMode.parse(mode)
    if asked is ExportMode.BASE:
        raise InvalidInputError(f"--mode must be one of {', '.join(ExportMode.choices())}, got 'base'")
    half = half_precision(dtype)
    if half and asked is ExportMode.UNMERGED and adapter:
        raise InvalidInputError(
            "--dtype float16/bfloat16 stores merged weights; it does not apply to --mode unmerged"
        )
    adapters = as_list(adapter) if adapter else []
    quant = check_quantize(quantize, keep_adapter, half, adapters)
    if asked is ExportMode.ADAPTER:
        check_adapter_mode(adapters, max_rank, weights)
    check_dora_mode(adapters, asked, keep_adapter, optimize)
    if keep_adapter and asked is not ExportMode.ADAPTER:
        asked = ExportMode.UNMERGED  # the adapter kept beside the quantized base
    if wants_stream(model_dir, stream):
        from loraexport.stages.streamed import streamed_export

        log(f"{model_dir}: streamed (the model is not loaded; memory stays bounded) …")
        return streamed_export(
            model_dir, out, adapters, weights, asked, half, quant, keep_adapter, force, allow_pickle, log,
            show_progress,
        )  # fmt: skip
    out_plan = plan(out, force, log, {"--model": model_dir, "--adapter": adapters})
    check_opset(opset, exporter or detect_family(model_dir).exporter)  # before the weights are read
    check_optimize(model_dir, optimize)
    loaded = load_inputs(model_dir, adapters, allow_pickle, weights)
    mode_ = asked if loaded.adapters else ExportMode.BASE
    model = loaded.base
    keep = probes = None
    if mode_ is ExportMode.ADAPTER:
        model, probes, rank = probe_model(model, loaded.adapters, max_rank, torch_dtype(half))
        keep = [f for pair in probes.values() for f in pair] if quant else None
    elif mode_ is ExportMode.UNMERGED:
        model = unmerged_model(model, loaded.adapters, loaded.weights)
        keep = lora_factors(loaded) if quant else None
    elif loaded.adapters or half:
        storage = torch_dtype(half)
        model = merged_model(model, loaded.adapters, loaded.weights, storage_dtype=storage)[0]
    inputs = {"model": model_provenance(model_dir)}
    if loaded.adapters:
        inputs["adapters"] = adapter_provenance(loaded)
    meta: dict = {}
    with write_output(out_plan, meta=meta) as tmp:
        result = export_model(loaded.family, model, tmp, opset, exporter, half or quant, keep, optimize)
        meta.update(describe(loaded.family, model, result, half or quant, mode_), inputs=inputs)
        if probes is not None:
            describe_adapters(tmp, list(result.inputs), probes, rank, loaded.adapters, meta)
        write_extras(loaded.family, Path(model_dir), tmp, meta)
    return result
