"""``merge_and_export``: the stages chained — load and check once, merge, export, verify —
into one output folder written atomically (``output``), described once (``provenance``)."""

from __future__ import annotations

from pathlib import Path

from loraexport.artifact.output import write_output
from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode, half_precision
from loraexport.errors import InvalidInputError
from loraexport.export.onnx import DEFAULT_OPSET, check_opset
from loraexport.models.registry import detect_family
from loraexport.report.contents import Report
from loraexport.report.files import raise_if_output_failed, write_report
from loraexport.stages.adapter_mode import check_adapter_mode
from loraexport.stages.export import check_optimize, check_quantize, write_extras
from loraexport.stages.graphs import export_into, export_subject
from loraexport.stages.inputs import (
    Log,
    adapter_provenance,
    as_list,
    check_dora_mode,
    check_eval_data,
    load_inputs,
    model_provenance,
    plan,
    quiet,
)
from loraexport.stages.merge import merged_model
from loraexport.stages.prove import FloatGraphs
from loraexport.stages.streamed import streamed_merge_and_export, wants_stream
from loraexport.stages.verify import new_report, verify_into
from loraexport.verify.options import VerifyOptions


def merge_and_export(
    base: str | Path,
    adapter: str | Path | list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    keep_adapter: bool = False,
    optimize: bool = False,
    mode: str = "merged",
    max_rank: int | None = None,
    verify_output: bool = True,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str | None = None,
    allow_pickle: bool = False,
    options: VerifyOptions | None = None,
    log: Log = quiet,
    stream: bool | None = None,
    show_progress: bool = False,
    **option_fields,
) -> Report:
    """Merge ``adapter`` into ``base``, export to ONNX, verify; write everything to ``out`` atomically.

    ``adapter`` is one path or a list (merged as ``W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` with ``weights``).
    ``dtype`` float16/bfloat16: the merged weights are rounded to it once and the ONNX file
    stores them in it (the graph computes in float32). ``quantize`` int8/int4: the graph's
    MatMuls are quantized; with ``keep_adapter`` the base's only, the LoRA branches kept in
    float32 beside them (the graph is then the unmerged one). ``optimize``: fused, last-position
    graphs (``export.optimize``), verified like the others. ``mode`` "adapter": the base once,
    the LoRA factors graph inputs, one ``.onnx_adapter`` per adapter (``export.adapter``), each
    verified against its own unmerged model; ``max_rank`` raises the graph's rank.
    ``options`` (or its fields as keywords: providers, samples, eval_data, ...): how to verify.
    ``stream``: True writes the export from the checkpoint tensor by tensor and verifies it
    against a layer-streamed reference, in bounded memory (``stages.streamed``; Llama, Mistral,
    Qwen2); None (auto) does so when the model would not fit in memory; False never.
    Raises ``VerificationFailedError`` (after ``out`` is written) when parity fails.
    """
    half = half_precision(dtype)
    adapters = as_list(adapter)
    quant = check_quantize(quantize, keep_adapter, half, adapters)
    asked = ExportMode.parse(mode)
    if asked not in (ExportMode.MERGED, ExportMode.ADAPTER):
        raise InvalidInputError(f"merge-and-export --mode is merged or adapter, got {mode!r}")
    if asked is ExportMode.ADAPTER:
        check_adapter_mode(adapters, max_rank, weights)
    opts = options or VerifyOptions(**option_fields)  # everything checked before any work
    check_dora_mode(adapters, asked, keep_adapter)
    if wants_stream(base, stream):
        check_eval_data(opts.eval_data)
        if asked is ExportMode.ADAPTER:
            raise InvalidInputError("--mode adapter is not streamed: give --no-stream")
        log(f"{base}: streamed (the model is not loaded; memory stays bounded) …")
        return streamed_merge_and_export(
            base, adapters, out, weights=weights, half=half, quant=quant, keep_adapter=keep_adapter,
            verify_output=verify_output, force=force, opts=opts, allow_pickle=allow_pickle, log=log,
            progress=show_progress,
        )  # fmt: skip
    out_plan = plan(out, force, log, {"--base": base, "--adapter": adapters, "--eval-data": opts.eval_data})
    check_eval_data(opts.eval_data)
    check_opset(opset, exporter or detect_family(base).exporter)  # before the weights are read
    check_optimize(base, optimize)
    log(f"loading {base} and {', '.join(map(str, adapters))} …")
    loaded = load_inputs(base, adapters, allow_pickle, weights)
    storage = torch_dtype(half)
    merged = stats = None
    if asked is not ExportMode.ADAPTER:  # adapter mode merges nothing: each adapter stays a file
        merged, stats = merged_model(loaded.base, loaded.adapters, loaded.weights, storage_dtype=storage)
        log(f"merged {stats.modules_merged} modules in {stats.seconds * 1e3:.1f} ms ({stats.compute_dtype})")
    inputs = {"base": model_provenance(base), "adapters": adapter_provenance(loaded)}
    kind = ExportMode.UNMERGED if keep_adapter and asked is ExportMode.MERGED else asked
    subject = export_subject(loaded, kind, half or quant, max_rank, merged=merged)
    meta: dict = {}
    with write_output(out_plan, meta=meta) as tmp:
        # the float graphs before quantizing, for the proof (quantized again, not exported again)
        made = FloatGraphs(tmp, (Path(base), *map(Path, adapters))) if quant and verify_output else None
        try:
            log(f"exporting to ONNX ({exporter or loaded.family.exporter} exporter) …")
            on_float = made.keep if made else None
            how = {"opset": opset, "exporter": exporter, "optimize": optimize, "on_float": on_float}
            result = export_into(loaded, subject, tmp, meta, **how)
            log(f"exported {', '.join(result.files)} in {result.seconds:.1f} s")
            meta["inputs"] = inputs
            write_extras(loaded.family, Path(base), tmp, meta)
            report = new_report(base, loaded, stats, result)
            if verify_output:  # loraexport.json is written when the output is complete: ``meta`` now
                verify_into(report, loaded, merged, tmp, meta, opts, log, half, made=made)
        finally:
            if made:
                made.close()
        write_report(report, tmp)
    raise_if_output_failed(report, out)
    return report
