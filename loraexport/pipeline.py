"""``merge_and_export``: the stages chained — load and check once, merge, export, verify —
into one output folder written atomically (``output``), described once (``provenance``): the
export flow (``stages.export.write_export``) with the verify flow (``stages.verify.verify_into``)
as its check, whatever the residency."""

from __future__ import annotations

from pathlib import Path

from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode
from loraexport.core.memory import Stage
from loraexport.errors import InvalidInputError
from loraexport.export.onnx import check_opset
from loraexport.models.registry import detect_family
from loraexport.report.contents import Report
from loraexport.report.files import raise_if_output_failed
from loraexport.spec import RUN_FIELDS, SPEC_FIELDS, ExportSpec, Run, run_of, spec_of, split_fields
from loraexport.stages.export import Source, check_optimize, export_subject, write_export
from loraexport.stages.inputs import as_list, check_dora_mode, check_eval_data, load_inputs, plan
from loraexport.stages.merge import merged_model
from loraexport.stages.residency import check_streamable, streams, verifies_in_memory
from loraexport.stages.sources import FromCheckpoint, FromModel, from_checkpoint
from loraexport.stages.verification import Verification
from loraexport.stages.verify import in_memory, layered, verify_into
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
    reference, in bounded memory (``stages.sources``; Llama, Mistral, Qwen2); None (the default)
    does so whenever the streamed path does what is asked (a model of at most 250 M parameters is
    then verified in memory, ``stages.residency``); False never.
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
    inputs = {"--base": base, "--adapter": adapters, "--eval-data": opts.eval_data}
    source: Source
    if streams(base, spec, opts if run.verify_output else None, adapters):
        check_eval_data(opts.eval_data)
        if spec.mode is ExportMode.ADAPTER:
            raise InvalidInputError("--mode adapter is not streamed: give --no-stream")
        log(f"{base}: streamed (the model is not loaded; memory stays bounded) …")
        spec.check_streamed()
        check_streamable(base, ExportMode.MERGED, spec.half, run.verify_output, opts)
        out_plan = plan(out, run.force, log, inputs)
        source = from_checkpoint(base, adapters, weights, spec.half, run, spec.keep_adapter)
        # chosen, not asked (--stream): a small model is verified in memory, with the fuller checks
        small = spec.stream is None and verifies_in_memory(base)
        check = _streamed_check(source, adapters, weights, spec, opts, run, small)
    else:
        out_plan = plan(out, run.force, log, inputs)
        check_eval_data(opts.eval_data)
        check_opset(spec.opset, spec.exporter or detect_family(base).exporter)  # before the weights are read
        check_optimize(base, spec.optimize)
        log(f"loading {base} and {', '.join(map(str, adapters))} …")
        loaded = load_inputs(base, adapters, run.allow_pickle, weights)
        merged = stats = None
        if spec.mode is not ExportMode.ADAPTER:  # adapter mode merges nothing: each adapter stays a file
            merged, stats = merged_model(
                loaded.base, loaded.adapters, loaded.weights, storage_dtype=torch_dtype(spec.half)
            )
            took = f"{stats.seconds * 1e3:.1f} ms ({stats.compute_dtype})"
            log(f"merged {stats.modules_merged} modules in {took}")
        subject = export_subject(loaded, spec.mode, spec.stored, spec.max_rank, merged=merged)
        source = FromModel(Path(base), loaded, subject, stats)

        def check(report: Report, onnx_dir: Path, meta: dict, made) -> None:
            v = Verification(report, onnx_dir, meta, opts, log, made=made, wrote=True, base=Path(base))
            verify_into(v, in_memory(loaded, merged, meta))

    _, report = write_export(source, out_plan, spec, run, "base", check)
    raise_if_output_failed(report, out)
    return report


def _streamed_check(
    source: FromCheckpoint, adapters: list, weights, spec: ExportSpec, opts, run: Run, small: bool
):
    """The verification of an export written from the checkpoint: with the model in memory
    (``small``: loaded only now, after the export), else against the layer-streamed reference."""
    how = "the model in memory (small enough)" if small else "the unmerged model computed layer by layer"

    def check(report: Report, onnx_dir: Path, meta: dict, made) -> None:
        report.notes.append(
            "streamed: no model object was built for the export, written from the checkpoint tensor by "
            f"tensor; verification's reference is {how}"
        )
        if not small:
            v = Verification(
                report, onnx_dir, meta, opts, run.log, records=source.records, progress=run.show_progress,
                base=Path(source.path),
            )  # fmt: skip
            verify_into(v, layered(source))
            return
        with Stage("verify, the model in memory", source.records):
            loaded = load_inputs(source.path, adapters, run.allow_pickle, weights)
            storage = torch_dtype(spec.half)
            merged, report.merge = merged_model(
                loaded.base, loaded.adapters, loaded.weights, storage_dtype=storage
            )
            v = Verification(report, onnx_dir, meta, opts, run.log, base=Path(source.path))
            verify_into(v, in_memory(loaded, merged, meta))

    return check
