"""A model in memory exported into a folder: the graphs of the subject an export mode makes of
the loaded inputs, in the precision asked for, and ``loraexport.json``'s description of them.
The ``export`` and ``merge-and-export`` commands write with it; ``verify`` exports the reference
with it again to prove a quantized file (``stages.prove``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraexport.artifact.provenance import export_description
from loraexport.artifact.schema import EXPORTERS
from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode, Precision, half_precision, quantization
from loraexport.errors import AdapterMismatchError, ExportError, InvalidInputError
from loraexport.export.adapter import probe_factors
from loraexport.export.adapter_files import describe_adapters, refuse_dora
from loraexport.export.half import store_weights_half
from loraexport.export.onnx import EXTERNAL_DATA_BYTES, ExportResult, export_graphs
from loraexport.export.optimize import optimized_export
from loraexport.export.quantize import lora_matmuls, quantization_description, quantize_graph
from loraexport.lora.adapter import Adapter
from loraexport.lora.inject import lora_layers
from loraexport.models.base import ModelFamily
from loraexport.spec import ExportSpec
from loraexport.stages.merge import merged_model, unmerged_model


def export_model(
    family: ModelFamily,
    model: nn.Module,
    out_dir: Path,
    spec: ExportSpec = ExportSpec(),
    keep: list[np.ndarray] | None = None,
    *,
    on_float=None,
    origins: dict | None = None,
) -> ExportResult:
    """Export ``model``'s graphs into ``out_dir`` (which exists) as ``spec`` says (opset,
    exporter, precision, graph); an optimized graph: the family's (``export.optimize``;
    ``check_optimize`` said the family has one). ``on_float(path)``: called with each graph file
    before it is quantized (verify's proof maps the float weights to the model's modules there);
    ``origins``: a graph written by loraexport itself fills it with the modules each weight holds
    (``export.graph_writer.Graph.origins``).

    float16/bfloat16: store the weights in it (``export.half``); ``model`` must already hold
    weights rounded to it, so nothing is lost in the file. int8/int4: quantize the graph's
    MatMuls (``export.quantize``), all but those whose weight is one of ``keep`` (the LoRA factors
    of an unmerged model: the adapter stays in float32).
    """
    opset, exporter, optimize = spec.opset, spec.exporter, spec.optimize
    half, quant = spec.half, spec.quant
    if optimize:
        if family.optimized_specs is None:
            raise ExportError(f"--optimize: the {family.name} family has no optimized graph")
        nbits = quant if quant in (Precision.INT8, Precision.INT4) else None
        how = {"precision": nbits, "block": spec.block_size} | (
            {"origins": origins} if origins is not None else {}
        )
        specs = family.optimized_specs(model)
        result = optimized_export(model, specs, out_dir, opset, exporter or family.exporter, **how)
    else:
        result = export_graphs(family.graph_specs(model), out_dir, opset, exporter or family.exporter)
    if half:
        for g in result.inputs:
            store_weights_half(out_dir / f"{g}.onnx", half.value, EXTERNAL_DATA_BYTES)
    if quant and not result.optimized.get("quantized"):  # a graph written quantized is done
        result.exporter_log += quantize_graphs(
            out_dir, list(result.inputs), quant, keep, on_float, spec.block_size
        )
    if half or quant:
        names = [f for g in result.inputs for f in (f"{g}.onnx", f"{g}.onnx.data")]
        result.files = [f for f in names if (out_dir / f).is_file()]
        result.bytes = sum((out_dir / f).stat().st_size for f in result.files)
    return result


def quantize_graphs(
    out_dir: Path, graphs: list[str], quant: Precision, keep, on_float=None, block: int | None = None
) -> str:
    """Quantize each graph file in place, all MatMuls but those whose weight is one of ``keep``
    (int8/int4 in blocks of ``block``, default ``NBITS_BLOCK``); return the quantizer's log."""
    log = ""
    for g in graphs:
        path = out_dir / f"{g}.onnx"
        if on_float is not None:
            on_float(path)
        kept = lora_matmuls(path, keep) if keep else []
        if keep and not kept:
            raise ExportError(f"{path.name}: the LoRA branch's MatMuls were not found; cannot keep them")
        log += quantize_graph(path, quant, kept, block)
    return log


def describe(
    family: ModelFamily,
    model: nn.Module,
    result: ExportResult,
    precision: Precision | None,
    mode: ExportMode,
    block: int | None = None,
) -> dict:
    """``loraexport.json``'s description of an export (``provenance``); a quantized one says how,
    and whether the adapter was merged before quantizing or kept beside the quantized base."""
    facts = family.runtime_meta(model) | {"family": family.name}
    out = export_description(facts, result, (precision or Precision.FLOAT32).value, mode.value)
    return out | describe_quantization(precision, mode, block)


def describe_quantization(precision: Precision | None, mode: ExportMode, block: int | None = None) -> dict:
    """``{"quantization": ...}`` for a quantized export (its settings, where the adapter is)."""
    if precision is None or not precision.is_quantized:
        return {}
    kept = mode in (ExportMode.UNMERGED, ExportMode.ADAPTER)
    adapter = "kept in float32" if kept else "merged"
    return {"quantization": quantization_description(precision, adapter, block)}


def torch_exporter_of(meta: dict) -> str | None:
    """The torch.onnx exporter an export used (None: the family's default, also for a graph
    loraexport wrote itself), for the graphs exported to compare with it."""
    exporter = meta.get("exporter")
    return exporter if exporter in EXPORTERS else None


def lora_factors(loaded) -> list[np.ndarray]:
    """Every LoRA A and B of the loaded adapters, as the graph holds them (float32)."""
    return [t.detach().float().numpy() for a in loaded.adapters for pair in a.weights.values() for t in pair]


@dataclass
class Subject:
    """What an export of loaded inputs writes: the model, in which mode and precision; the LoRA
    factors the quantizer leaves in float32 (``keep``); adapter mode's probes and rank."""

    model: nn.Module
    mode: ExportMode
    precision: Precision | None = None
    keep: list[np.ndarray] | None = None
    probes: dict | None = None
    rank: int | None = None


def export_subject(
    loaded, mode: ExportMode, precision: Precision | None, max_rank: int | None = None, merged=None
) -> Subject:
    """The model an export of ``loaded`` in ``mode`` (merged, unmerged — the adapter kept beside a
    quantized base — or adapter) writes; ``merged``: the merged model, when already made."""
    half = half_precision(precision)
    quant = quantization(precision)
    if not loaded.adapters:
        model = merged_model(loaded.base, [], storage_dtype=torch_dtype(half))[0] if half else loaded.base
        return Subject(model, ExportMode.BASE, precision)
    if mode is ExportMode.ADAPTER:
        model, probes, rank = probe_model(loaded.base, loaded.adapters, max_rank, torch_dtype(half))
        keep = [f for pair in probes.values() for f in pair] if quant else None
        return Subject(model, mode, precision, keep, probes, rank)
    if mode is ExportMode.UNMERGED:
        model = unmerged_model(loaded.base, loaded.adapters, loaded.weights)
        return Subject(model, mode, precision, lora_factors(loaded) if quant else None)
    if merged is None:
        storage = torch_dtype(half)
        merged = merged_model(loaded.base, loaded.adapters, loaded.weights, storage_dtype=storage)[0]
    return Subject(merged, ExportMode.MERGED, precision)


def export_into(
    loaded,
    subject: Subject,
    out_dir: Path,
    meta: dict,
    spec: ExportSpec = ExportSpec(),
    *,
    on_float=None,
    origins=None,
) -> ExportResult:
    """``subject`` exported into ``out_dir`` (which exists) with ``spec``'s graph, opset and
    exporter, its description added to ``meta`` (adapter mode: the probes made graph inputs and
    one ``.onnx_adapter`` per adapter)."""
    spec = replace(spec, precision=subject.precision or Precision.FLOAT32)
    result = export_model(
        loaded.family, subject.model, out_dir, spec, subject.keep, on_float=on_float, origins=origins
    )
    meta.update(
        describe(loaded.family, subject.model, result, subject.precision, subject.mode, spec.block_size)
    )
    if subject.probes is not None:
        describe_adapters(out_dir, list(result.inputs), subject.probes, subject.rank, loaded.adapters, meta)
    return result


def probe_model(base: nn.Module, adapters: list[Adapter], max_rank: int | None, storage=None):
    """(the base with LoRA branches holding probe factors at the graph's rank, scaling 1; the
    probes; the rank). The modules are the first adapter's; the rank the largest of every
    adapter's modules and ``max_rank``. ``storage`` (a torch half dtype, ``--dtype``): the
    base's weights rounded to it first, so the file stores them in it exactly; the probes, and
    so the adapter inputs, stay float32."""
    for a in adapters:
        refuse_dora(a)
        if a.replacements:
            name = next(iter(a.replacements))
            raise AdapterMismatchError(
                f"{a.path}: replaces base tensor {name} (bias or modules_to_save): an onnxruntime adapter "
                "holds LoRA factors only; use --mode merged"
            )
    rank = max(a.config.rank(m) for a in adapters for m in a.weights)
    if max_rank is not None and max_rank < rank:
        raise InvalidInputError(f"--max-rank {max_rank} is below the adapters' largest rank, {rank}")
    rank = max_rank or rank
    if storage is not None:
        base = merged_model(base, [], storage_dtype=storage)[0]
    model = unmerged_model(base, _template(adapters, rank))
    layers = lora_layers(model)
    shapes = {m: (layer.in_features, layer.out_features) for m, layer in layers.items()}
    probes = probe_factors(shapes, rank)
    for m, layer in layers.items():
        a, b = probes[m]
        layer.lora_A = nn.Parameter(torch.from_numpy(a), requires_grad=False)
        layer.lora_B = nn.Parameter(torch.from_numpy(b), requires_grad=False)
        layer.r, layer.scaling = rank, 1.0
    return model, probes, rank


def _template(adapters: list[Adapter], rank: int) -> Adapter:
    """An adapter of zeros on every module any of ``adapters`` adapts (their union, in any
    order), at ``rank``: what the graph is built from."""
    shapes: dict[str, tuple[int, int]] = {}
    for a in adapters:
        for m, (down, up) in a.weights.items():
            shape = (down.shape[1], up.shape[0])
            if shapes.setdefault(m, shape) != shape:
                raise AdapterMismatchError(
                    f"{m}: the adapters disagree on its shape ({shapes[m]} and {shape})"
                )
    config = dataclasses.replace(
        adapters[0].config,
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(shapes),
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        modules_to_save=None,
        bias="none",
    )
    zeros = {m: (torch.zeros(rank, i), torch.zeros(o, rank)) for m, (i, o) in shapes.items()}
    return Adapter(config, zeros)
