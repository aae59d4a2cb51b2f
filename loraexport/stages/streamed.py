"""Models larger than memory: ``export`` and ``merge-and-export`` streamed, in bounded memory.

The in-memory path holds the model (and, to verify, its unmerged twin and a float64 copy): about
2.4–2.6× the float32 weights (``make bench-large``). The streamed path never builds a model:
  * export: the fused decoder graph (``export.fused``) written from the checkpoint tensor by tensor
    (``export.streamed``), merged in float64 per tensor or with the adapter kept as branches, and
    stored in float32, float16/bfloat16 or int8/int4 as each weight is read;
  * verify: onnxruntime runs the export as usual; the reference is the unmerged model computed
    layer by layer from the safetensors (``verify.streamed``), in float32 and float64 in one pass
    (``stages.verify_streamed``).
Each stage's wall time and peak resident memory go into the report (``memory.Stage``).

``--stream`` asks for it; by default (auto) a Llama/Mistral/Qwen2 checkpoint is streamed when the
in-memory path would need more memory than the machine has available.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from loraexport.artifact.output import write_output
from loraexport.artifact.schema import BUILDER
from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode, Precision
from loraexport.core.memory import Stage, StageRecord, available, peak_rss
from loraexport.core.progress import Progress
from loraexport.errors import InvalidInputError, UnsupportedAdapterError
from loraexport.export.fused import write_fused_decoder
from loraexport.export.fused_config import model_facts
from loraexport.export.onnx import ExportResult
from loraexport.export.optimize import fused_result
from loraexport.export.quantize import quantization_description
from loraexport.export.streamed import Checkpoint, CheckpointSource
from loraexport.lora.adapter import Adapter
from loraexport.lora.weights import check_dora
from loraexport.models.registry import detect_family
from loraexport.report.contents import Report
from loraexport.report.files import raise_if_output_failed, write_report
from loraexport.spec import ExportSpec, Run
from loraexport.stages.extras import write_extras
from loraexport.stages.inputs import Log, adapter_info, check_weights, machine, model_provenance, plan
from loraexport.stages.residency import check_streamable
from loraexport.verify.chunked import is_fused
from loraexport.verify.options import VerifyOptions

SESSION_MARGIN = 1.25  # onnxruntime's session beyond its weights: arena, activations, the cache


def session_bytes(checkpoint: Checkpoint, precision: Precision) -> int:
    """What onnxruntime holds to run the export, about: float32 weights for a float32 or
    half-stored export (it folds the Casts when it loads), else the quantized MatMuls (at most 8
    bits and a float32 scale per block of 16) and a float32 embedding."""
    if not precision.is_quantized:
        return 4 * checkpoint.numel
    embed = math.prod(checkpoint.shape("model.embed_tokens.weight"))
    return int((checkpoint.numel - embed) * (1 + 4 / 16)) + 4 * embed


def check_session_fits(checkpoint: Checkpoint, precision: Precision) -> None:
    """Refuse (``InvalidInputError``, before any work) to verify an export onnxruntime could not
    hold in the memory available now, and say what it would need: an export that is not the fused
    graph runs in one session (the fused graph runs a few layers at a time, ``verify.chunked``)."""
    need, free = int(session_bytes(checkpoint, precision) * SESSION_MARGIN), available()
    if free is not None and need > free:
        how = (
            "float32 compute of its weights"
            if not precision.is_quantized
            else f"its {precision.value} weights"
        )
        raise InvalidInputError(
            f"verifying this export needs about {need / 1e9:.1f} GB for onnxruntime to run it ({how}); "
            f"{free / 1e9:.1f} GB is available: give --no-verify, --quantize int8/int4, or run on a machine "
            "with more memory"
        )


def _meta(config, precision: Precision, mode: ExportMode, info: dict, result: ExportResult) -> dict:
    """``loraexport.json``'s description, as ``stages.export.describe`` writes it for a model in memory."""
    out = {
        "model": model_facts(config),
        "opset": result.opset,
        "exporter": BUILDER,
        "weights_dtype": precision.value,
        "graphs": {
            "model": {
                "inputs": result.inputs["model"],
                "outputs": result.outputs["model"],
                **result.layouts["model"],
            }
        },
        "mode": mode.value,
        "optimize": result.optimized,
        "streamed": True,
    }
    if precision.is_quantized:
        adapter = "kept in float32" if mode is ExportMode.UNMERGED else "merged"
        out["quantization"] = quantization_description(precision, adapter)
    return out


def write_streamed(
    src: CheckpointSource, out_dir: Path, precision: Precision, log: Log, progress: bool
) -> ExportResult:
    """``out_dir/model.onnx`` (+ ``.data``) written from ``src`` tensor by tensor."""
    t0 = time.perf_counter()
    path = out_dir / "model.onnx"
    total = src.checkpoint.nbytes
    with Progress(total, "export", "B", progress) as bar:
        src.checkpoint.on_read = bar.update
        info = write_fused_decoder(src, path, precision, streamed=True)
        src.checkpoint.on_read = None
    cache = [f"{i}.{k}" for i in range(src.layers) for k in ("key", "value")]
    graph_io = (
        ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{c}" for c in cache)],
        ["logits", *(f"present.{c}" for c in cache)],
    )
    graph = "written by loraexport from the checkpoint, tensor by tensor (streamed)"
    result = fused_result(out_dir, graph_io, {"graph": graph, **info}, t0)
    log(
        f"exported {', '.join(result.files)} ({result.bytes / 1e9:.2f} GB) in {result.seconds:.1f} s "
        "(streamed)"
    )
    return result


def _mode(adapters: list, keep_adapter: bool) -> ExportMode:
    if not adapters:
        return ExportMode.BASE
    return ExportMode.UNMERGED if keep_adapter else ExportMode.MERGED


def _load(base, adapter_paths, weights, keep_adapter, half, allow_pickle) -> CheckpointSource:
    adapters = [Adapter.load(a, allow_pickle) for a in adapter_paths]
    check_dora(adapters, weights)
    dora = next((a for a in adapters if a.config.use_dora), None)
    if keep_adapter and dora is not None:
        raise UnsupportedAdapterError(
            f"{dora.path} is a DoRA adapter: a streamed unmerged graph keeps LoRA branches beside the base, "
            "and DoRA's magnitude rescales the whole weight; export it merged"
        )
    storage = torch_dtype(half) or torch.float32
    return CheckpointSource(
        base, adapters, check_weights(adapters, weights), merge=not keep_adapter, storage=storage
    )


def memory_facts(checkpoint: Checkpoint) -> dict:
    """The run's peak resident memory beside the weights' bytes, for the report."""
    peak = peak_rss()
    return {
        "weights_bytes": checkpoint.nbytes,
        "float32_weights_bytes": 4 * checkpoint.numel,
        "peak_rss_bytes": peak,
        "weights_gb": round(checkpoint.nbytes / 1e9, 3),
        "float32_weights_gb": round(4 * checkpoint.numel / 1e9, 3),
        "peak_rss_gb": round(peak / 1e9, 3),
    }


def streamed_export(model_dir, out, adapters: list, weights, spec: ExportSpec, run: Run) -> ExportResult:
    """``loraexport export`` of a model larger than memory (see the module docstring)."""
    spec.check_streamed()
    check_streamable(model_dir, spec.mode, spec.half, verify=False, command="export")
    out_plan = plan(out, run.force, run.log, {"--model": model_dir, "--adapter": adapters})
    keep = spec.mode is ExportMode.UNMERGED
    src = _load(model_dir, adapters, weights, keep, spec.half, run.allow_pickle)
    kind = _mode(adapters, keep)
    meta: dict = {}
    with write_output(out_plan, meta=meta) as tmp:
        result = write_streamed(src, tmp, spec.precision, run.log, run.show_progress)
        meta.update(
            _meta(src.config, spec.precision, kind, result.optimized, result), inputs=_inputs(model_dir, src)
        )
        _extras(model_dir, tmp, meta)
    return result


def _extras(model_dir, tmp: Path, meta: dict) -> None:
    write_extras(detect_family(model_dir), Path(model_dir), tmp, meta)


def _inputs(model_dir, src: CheckpointSource) -> dict:
    out = {"base": model_provenance(model_dir)}
    if src.adapters:
        out["adapters"] = [
            {"path": str(a.path), "sha256": a.sha256(), "weight": w}
            for a, w in zip(src.adapters, src.weights, strict=True)
        ]
    return out


def streamed_merge_and_export(
    base, adapters: list, out, weights, spec: ExportSpec, opts: VerifyOptions, run: Run, in_memory=None
) -> Report:
    """``merge-and-export`` written from the checkpoint: each stage's time and memory in the report.
    ``in_memory(report, onnx_dir, meta)``: verifies with the model in memory (a small model,
    ``residency.verifies_in_memory``); else the reference is computed layer by layer."""
    spec.check_streamed()
    check_streamable(base, ExportMode.MERGED, spec.half, run.verify_output, opts)
    log, progress, keep_adapter, precision = run.log, run.show_progress, spec.keep_adapter, spec.precision
    out_plan = plan(
        out, run.force, log, {"--base": base, "--adapter": adapters, "--eval-data": opts.eval_data}
    )
    records: list[StageRecord] = []
    with Stage("load and check the inputs (headers, adapters)", records):
        src = _load(base, adapters, weights, keep_adapter, spec.half, run.allow_pickle)
    kind = _mode(adapters, keep_adapter)
    meta: dict = {}
    with write_output(out_plan, meta=meta) as tmp:
        merged = "adapter kept as float32 branches" if keep_adapter else "merged in float64 per tensor"
        log(f"exporting {base} streamed ({precision.value}, {merged}) …")
        with Stage(f"export, streamed ({precision.value}; {merged})", records):
            result = write_streamed(src, tmp, precision, log, progress)
        meta.update(_meta(src.config, precision, kind, result.optimized, result), inputs=_inputs(base, src))
        _extras(base, tmp, meta)
        report = Report(
            {"path": str(base), "family": "hf-causal", "parameters": src.checkpoint.numel},
            [adapter_info(a, w) for a, w in zip(src.adapters, src.weights, strict=True)],
            export=result,
            machine=machine(),
        )
        how = (
            "the model in memory (small enough)"
            if in_memory
            else "the unmerged model computed layer by layer"
        )
        report.notes.append(
            "streamed: no model object was built for the export, written from the checkpoint tensor by "
            f"tensor; verification's reference is {how}"
        )
        if run.verify_output and in_memory is not None:
            with Stage("verify, the model in memory", records):
                in_memory(report, tmp, meta)
        elif run.verify_output:
            _verify(report, src, tmp, meta, precision, kind, opts, log, records, progress)
        report.stages = [r.to_json() for r in records]
        report.memory = memory_facts(src.checkpoint)
        write_report(report, tmp)
    raise_if_output_failed(report, out)
    return report


def verify_export(base, adapters, onnx_dir: Path, meta: dict, weights, opts, run: Run) -> Report:
    """``loraexport verify`` with the layer-streamed reference: a causal export (streamed or not)
    of a Llama/Mistral/Qwen2 checkpoint, against base + adapters unmerged, in bounded memory."""
    kind = ExportMode.parse(meta.get("mode", "merged"))
    precision = Precision.parse(meta.get("weights_dtype", "float32"))
    half = precision if precision.is_half else None
    check_streamable(base, kind, half, True, opts, command="verify")
    if (
        not isinstance(meta.get("model"), dict)
        or meta["model"].get("kind") != "causal"
        or kind is ExportMode.BASE
        and adapters
    ):
        raise InvalidInputError(
            f"{onnx_dir}: a streamed verification checks a merged or unmerged causal export"
        )
    records: list[StageRecord] = []
    with Stage("load and check the inputs (headers, adapters)", records):
        src = _load(base, adapters, weights, kind is ExportMode.UNMERGED, half, run.allow_pickle)
        if not is_fused(meta):  # a fused graph runs a few layers at a time (verify.chunked)
            check_session_fits(src.checkpoint, precision)
    report = Report(
        {"path": str(base), "family": "hf-causal", "parameters": src.checkpoint.numel},
        [adapter_info(a, w) for a, w in zip(src.adapters, src.weights, strict=True)],
        machine=machine(),
    )
    report.notes.append("verified against the unmerged model computed layer by layer from the checkpoint")
    mode = _mode(adapters, kind is ExportMode.UNMERGED)
    _verify(report, src, onnx_dir, meta, precision, mode, opts, run.log, records, run.show_progress)
    report.stages = [r.to_json() for r in records]
    report.memory = memory_facts(src.checkpoint)
    return report


def _verify(report, src, onnx_dir, meta, precision, kind, opts, log, records, progress) -> None:
    """A float32 export's parity, or a quantized one's proof, parity and quality, streamed."""
    from loraexport.stages.verification import Verification

    if precision.is_quantized:
        from loraexport.stages.verify_streamed_quantized import verify_streamed_quantized as run
    else:
        from loraexport.stages.verify_streamed import verify_streamed as run
    v = Verification(report, onnx_dir, meta, opts, log, records=records, progress=progress)
    run(v, src, precision, kind)
