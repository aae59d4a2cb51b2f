"""The export stage: a model (merged, unmerged or the base) to ONNX in an output folder, with
the weights stored in the precision asked for and ``loraexport.json`` describing it."""

from __future__ import annotations

from pathlib import Path

from loraexport.artifact.output import write_output
from loraexport.core.enums import ExportMode, Precision, half_precision, quantization
from loraexport.core.io import read_json
from loraexport.errors import ExportError, InvalidInputError, ModelFormatError
from loraexport.export.fused_config import check_config
from loraexport.export.onnx import (
    DEFAULT_OPSET,
    ExportResult,
    check_opset,
)
from loraexport.models.registry import detect_family
from loraexport.models.types import FUSED_TYPES, OPTIMIZED_TYPES
from loraexport.stages.adapter_mode import check_adapter_mode
from loraexport.stages.extras import write_extras
from loraexport.stages.graphs import (  # noqa: F401 (re-exported: the export stage's names)
    Subject,
    describe,
    describe_quantization,
    export_into,
    export_model,
    export_subject,
    lora_factors,
    quantize_graphs,
    torch_exporter_of,
)
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
from loraexport.stages.streamed import wants_stream


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
    return OPTIMIZED_TYPES


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
    subject = export_subject(loaded, asked, half or quant, max_rank)
    inputs = {"model": model_provenance(model_dir)}
    if loaded.adapters:
        inputs["adapters"] = adapter_provenance(loaded)
    meta: dict = {}
    with write_output(out_plan, meta=meta) as tmp:
        result = export_into(loaded, subject, tmp, meta, opset=opset, exporter=exporter, optimize=optimize)
        meta["inputs"] = inputs
        write_extras(loaded.family, Path(model_dir), tmp, meta)
    return result
