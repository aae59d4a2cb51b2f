"""``merge_and_export``: the stages chained — load and check once, merge, export, verify —
into one output folder written atomically (``output``), described once (``provenance``)."""

from __future__ import annotations

from pathlib import Path

from loraexport.artifact.output import write_output
from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode
from loraexport.errors import InvalidInputError
from loraexport.export.onnx import check_opset
from loraexport.models.registry import detect_family
from loraexport.report.contents import Report
from loraexport.report.files import raise_if_output_failed, write_report
from loraexport.spec import RUN_FIELDS, SPEC_FIELDS, ExportSpec, Run, run_of, spec_of, split_fields
from loraexport.stages.export import check_optimize, write_extras
from loraexport.stages.graphs import export_into, export_subject
from loraexport.stages.inputs import (
    adapter_provenance,
    as_list,
    check_dora_mode,
    check_eval_data,
    load_inputs,
    model_provenance,
    plan,
)
from loraexport.stages.merge import merged_model
from loraexport.stages.prove import FloatGraphs
from loraexport.stages.residency import streams, verifies_in_memory
from loraexport.stages.streamed import streamed_merge_and_export
from loraexport.stages.verification import Verification
from loraexport.stages.verify import new_report, verify_into
from loraexport.verify.options import OPTION_FIELDS, VerifyOptions, options_of


def merge_and_export(
    base: str | Path,
    adapter: str | Path | list[str | Path],
    out: str | Path,
    spec: ExportSpec | None = None,
    options: VerifyOptions | None = None,
    *,
    weights: list[float] | None = None,
    run: Run | None = None,
    **fields,
) -> Report:
    """Merge ``adapter`` into ``base``, export to ONNX, verify; write everything to ``out`` atomically.

    ``adapter`` is one path or a list (merged as ``W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` with ``weights``).
    ``spec`` (or its options as keywords: ``dtype``, ``quantize``, ``keep_adapter``, ``optimize``,
    ``mode``, ``max_rank``, ``stream``, ``opset``, ``exporter``; ``spec.ExportSpec.from_options``):
    what the export is. ``dtype`` float16/bfloat16: the merged weights are rounded to it once and
    the ONNX file stores them in it (the graph computes in float32). ``quantize`` int8/int4: the
    graph's MatMuls are quantized; with ``keep_adapter`` the base's only, the LoRA branches kept in
    float32 beside them (the graph is then the unmerged one). ``optimize``: fused, last-position
    graphs (``export.optimize``), verified like the others. ``mode`` "adapter": the base once, the
    LoRA factors graph inputs, one ``.onnx_adapter`` per adapter (``export.adapter``), each verified
    against its own unmerged model; ``max_rank`` raises the graph's rank. ``stream``: True writes
    the export from the checkpoint tensor by tensor and verifies it against a layer-streamed
    reference, in bounded memory (``stages.streamed``; Llama, Mistral, Qwen2); None (auto) does so
    when the model would not fit in memory; False never.
    ``options`` (or its fields as keywords: providers, samples, eval_data, ...): how to verify.
    ``run`` (or its fields as keywords: force, allow_pickle, log, show_progress, verify_output).
    Raises ``VerificationFailedError`` (after ``out`` is written) when parity fails.
    """
    spec_fields, option_fields, run_fields = split_fields(fields, SPEC_FIELDS, OPTION_FIELDS, RUN_FIELDS)
    run = run_of(run, run_fields)
    adapters = as_list(adapter)
    spec = spec_of(spec, spec_fields)
    spec.check(adapters, weights, modes=(ExportMode.MERGED, ExportMode.ADAPTER))
    opts = options_of(options, option_fields)  # everything checked before any work
    log = run.log
    check_dora_mode(adapters, spec.mode, spec.keep_adapter)
    if streams(base, spec, opts if run.verify_output else None, adapters):
        check_eval_data(opts.eval_data)
        if spec.mode is ExportMode.ADAPTER:
            raise InvalidInputError("--mode adapter is not streamed: give --no-stream")
        log(f"{base}: streamed (the model is not loaded; memory stays bounded) …")
        # chosen, not asked (--stream): a small model is verified in memory, with the fuller checks
        small = run.verify_output and spec.stream is None and verifies_in_memory(base)
        in_memory = _verifier(base, adapters, weights, spec, opts, run) if small else None
        return streamed_merge_and_export(base, adapters, out, weights, spec, opts, run, in_memory)
    out_plan = plan(
        out, run.force, log, {"--base": base, "--adapter": adapters, "--eval-data": opts.eval_data}
    )
    check_eval_data(opts.eval_data)
    check_opset(spec.opset, spec.exporter or detect_family(base).exporter)  # before the weights are read
    check_optimize(base, spec.optimize)
    log(f"loading {base} and {', '.join(map(str, adapters))} …")
    loaded = load_inputs(base, adapters, run.allow_pickle, weights)
    half = spec.half
    merged = stats = None
    if spec.mode is not ExportMode.ADAPTER:  # adapter mode merges nothing: each adapter stays a file
        merged, stats = merged_model(
            loaded.base, loaded.adapters, loaded.weights, storage_dtype=torch_dtype(half)
        )
        log(f"merged {stats.modules_merged} modules in {stats.seconds * 1e3:.1f} ms ({stats.compute_dtype})")
    inputs = {"base": model_provenance(base), "adapters": adapter_provenance(loaded)}
    subject = export_subject(loaded, spec.mode, spec.stored, spec.max_rank, merged=merged)
    meta: dict = {}
    with write_output(out_plan, meta=meta) as tmp:
        # the float graphs before quantizing, for the proof (quantized again, not exported again)
        verify_output = run.verify_output
        made = FloatGraphs(tmp, (Path(base), *map(Path, adapters))) if spec.quant and verify_output else None
        try:
            log(f"exporting to ONNX ({spec.exporter or loaded.family.exporter} exporter) …")
            on_float = made.keep if made else None
            result = export_into(loaded, subject, tmp, meta, spec, on_float=on_float)
            log(f"exported {', '.join(result.files)} in {result.seconds:.1f} s")
            meta["inputs"] = inputs
            write_extras(loaded.family, Path(base), tmp, meta)
            report = new_report(base, loaded, stats, result)
            if verify_output:  # loraexport.json is written when the output is complete: ``meta`` now
                verify_into(Verification(report, tmp, meta, opts, log, made=made), loaded, merged, half)
        finally:
            if made:
                made.close()
        write_report(report, tmp)
    raise_if_output_failed(report, out)
    return report


def _verifier(base, adapters: list, weights, spec: ExportSpec, opts: VerifyOptions, run: Run):
    """Verification with the model in memory, of an export written from the checkpoint."""

    def verify(report: Report, onnx_dir: Path, meta: dict) -> None:
        loaded = load_inputs(base, adapters, run.allow_pickle, weights)
        storage = torch_dtype(spec.half)
        merged, report.merge = merged_model(
            loaded.base, loaded.adapters, loaded.weights, storage_dtype=storage
        )
        verify_into(Verification(report, onnx_dir, meta, opts, run.log), loaded, merged, spec.half)

    return verify
