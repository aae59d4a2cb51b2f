"""The export stage: a model (merged, unmerged or the base) to ONNX in an output folder, with
the weights stored in the precision asked for and ``loraexport.json`` describing it."""

from __future__ import annotations

from pathlib import Path

from loraexport.artifact.output import write_output
from loraexport.core.io import read_json
from loraexport.errors import ExportError, InvalidInputError, ModelFormatError
from loraexport.export.fused_config import check_config
from loraexport.export.onnx import (
    ExportResult,
    check_opset,
)
from loraexport.models.registry import detect_family
from loraexport.models.types import FUSED_TYPES, OPTIMIZED_TYPES
from loraexport.spec import RUN_FIELDS, SPEC_FIELDS, ExportSpec, Run, run_of, spec_of, split_fields
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
    adapter_provenance,
    as_list,
    check_dora_mode,
    load_inputs,
    model_provenance,
    plan,
)
from loraexport.stages.residency import streams


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


def optimize_types() -> tuple[str, ...]:
    return OPTIMIZED_TYPES


def export(
    model_dir: str | Path,
    out: str | Path,
    spec: ExportSpec | None = None,
    *,
    adapter: str | Path | list[str | Path] | None = None,
    weights: list[float] | None = None,
    run: Run | None = None,
    **fields,
) -> ExportResult:
    """Export a model directory (optionally with adapters, ``merged`` or ``unmerged``) to ONNX.

    ``spec`` (or its options as keywords, ``spec.ExportSpec.from_options``): ``dtype``
    float16/bfloat16: the merged (or base) weights are rounded to it once and stored in it; the
    graph computes in float32. ``quantize`` int8/int4: the graph's MatMuls are quantized
    (``export.quantize``); with ``keep_adapter`` only the base's, the LoRA branches staying in
    float32 beside them (an unmerged graph). ``optimize``: fused, last-position graphs for Hugging
    Face decoders (``export.optimize``). ``stream``: True writes the fused graph from the checkpoint
    tensor by tensor, in bounded memory (``stages.streamed``); None (auto) does so when the model
    would not fit in memory; False never. ``run`` (or force, allow_pickle, log, show_progress).
    """
    spec_fields, run_fields = split_fields(fields, SPEC_FIELDS, RUN_FIELDS)
    run = run_of(run, run_fields)
    spec = spec_of(spec, spec_fields)
    adapters = as_list(adapter) if adapter else []
    spec.check(adapters, weights)
    check_dora_mode(adapters, spec.mode, spec.keep_adapter, spec.optimize)
    log = run.log
    if streams(model_dir, spec, None, adapters):
        from loraexport.stages.streamed import streamed_export

        log(f"{model_dir}: streamed (the model is not loaded; memory stays bounded) …")
        return streamed_export(model_dir, out, adapters, weights, spec, run)
    out_plan = plan(out, run.force, log, {"--model": model_dir, "--adapter": adapters})
    check_opset(spec.opset, spec.exporter or detect_family(model_dir).exporter)  # before the weights are read
    check_optimize(model_dir, spec.optimize)
    loaded = load_inputs(model_dir, adapters, run.allow_pickle, weights)
    subject = export_subject(loaded, spec.mode, spec.stored, spec.max_rank)
    inputs = {"model": model_provenance(model_dir)}
    if loaded.adapters:
        inputs["adapters"] = adapter_provenance(loaded)
    meta: dict = {}
    with write_output(out_plan, meta=meta) as tmp:
        result = export_into(loaded, subject, tmp, meta, spec)
        meta["inputs"] = inputs
        write_extras(loaded.family, Path(model_dir), tmp, meta)
    return result
