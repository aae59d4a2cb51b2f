"""Verification of a quantized streamed export (``--stream --quantize``) in bounded memory, in the
order ``stages.verify_quantized`` follows for a model in memory:

1. proof: the fused graph written again from the checkpoint and compared with the file, tensor by
   tensor (``stages.prove.prove_checkpoint``);
2. parity by arithmetic: onnxruntime runs the export computing in float32, a few layers at a time,
   against the layer-streamed reference on the dequantized weights the proof accepted, in float32
   and float64;
3. quality: the export as written against the layer-streamed unmerged float32 model and the base
   (``verify.quantized``'s figures), judged only under the user's budget.

Each reference pass reads the whole checkpoint (13.5 GB for a 7B model), and a generated token costs
onnxruntime a session per chunk: greedy decoding is run once, by the export as written, and both
references are teacher-forced along that continuation in the same pass as the prompt. Along it, a
model whose next token at every step is the one chosen decodes the same tokens greedily: for the
unmerged model that is "identical greedy tokens" exactly; the float-compute twin and the dequantized
reference must agree on every next token there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from loraexport.core.enums import ExportMode, Precision
from loraexport.core.memory import Stage
from loraexport.core.progress import Progress
from loraexport.errors import InvalidInputError
from loraexport.export.fused import write_fused_decoder
from loraexport.export.fused_config import model_facts
from loraexport.export.quantize import quantization_description
from loraexport.export.streamed import CheckpointSource
from loraexport.stages.prove import Proven, float_compute_dir, prove_checkpoint
from loraexport.stages.verification import Verification
from loraexport.stages.verify_quantized import DEQUANTIZED_REFERENCE, judge_quality
from loraexport.stages.verify_streamed import (
    NEW_TOKENS,
    ReferenceBar,
    case_result,
    eval_sources,
    generation_result,
    inputs_of,
    onnx_outputs,
    reference_decoder,
    setup_threads,
    streamed_inputs,
    without_adapter,
)
from loraexport.verify.chunked import is_fused, scratch_dir
from loraexport.verify.dequantized import FileWeights
from loraexport.verify.parity import FUSED_NOISE_MULTIPLE, QUANTIZED_FACTOR, ParityResult, compare_outputs
from loraexport.verify.quantized import QuantCost, adapter_figures, effect_sums


def verify_streamed_quantized(
    v: Verification, src: CheckpointSource, precision: Precision, kind: ExportMode
) -> None:
    """Proof, parity against the dequantized reference, quality; each step a stage."""
    report, onnx_dir, meta, opts, log = v.report, v.onnx_path, v.meta, v.opts, v.log
    records, progress = v.records, v.progress
    from loraexport.verify.streamed import StreamedDecoder

    threads = setup_threads(opts)
    ids, mask, what = streamed_inputs(src, opts.seed, eval_sources(opts))
    proven = _prove(report, src, onnx_dir, meta, precision, kind, log, records, progress)
    if not proven.proof.passed:
        return
    with Stage("verify: onnxruntime runs the export", records):
        log(
            f"verify: onnxruntime runs the export on {ids.shape[0]}×{ids.shape[1]} tokens, {NEW_TOKENS} new …"
        )
        q, got = onnx_outputs(onnx_dir, meta, threads, ids, mask, True, progress, inputs_of(src))
    # the prompt followed by the export's own greedy tokens: every reference is teacher-forced along it
    path = (
        np.concatenate([ids, got[:, :-1]], axis=1),
        np.concatenate([mask, np.ones_like(got[:, :-1])], axis=1),
    )
    t = ids.shape[1]
    _dequantized_parity(report, src, onnx_dir, meta, proven, kind, (ids, mask, what), path, q, threads, log,
                        records, progress)  # fmt: skip
    q0 = None
    if src.adapters:
        with Stage("verify: the export without the adapter (Q0)", records):
            q0 = _base_outputs(src, onnx_dir, meta, precision, kind, threads, ids, mask, log, progress)
    streams = [(torch.float32, True), (torch.float32, False)]
    with Stage("verify: layer-streamed reference, one pass (float32 + LoRA, float32 base)", records):
        log("verify: the layer-streamed unmerged reference, along the export's greedy tokens …")
        with ReferenceBar(src, progress, "reference") as bar:
            ref = reference_decoder(StreamedDecoder, src, bar)
            full = ref.forward(torch.from_numpy(path[0]), torch.from_numpy(path[1]), streams)
    want = full[streams[0]][:, t - 1 :].argmax(-1).numpy()  # the unmerged model's next tokens along it
    out = {s: v[:, :t] for s, v in full.items()}
    _quality(report, q, q0, out, streams, mask.astype(bool), generation_result(got, want), precision, kind,
             what, opts)  # fmt: skip


def _prove(report, src, onnx_dir, meta, precision, kind, log, records, progress) -> Proven:
    """The weight-level proof of a fused export against the checkpoint, tensor by tensor."""
    if not is_fused(meta):
        raise InvalidInputError(
            f"{onnx_dir}: a quantized export that is not loraexport's fused graph is proven with the model "
            "in memory: give --no-stream"
        )
    with Stage("verify: proof (the export written again from the checkpoint, compared)", records):
        log("verify: proof: the export written again from the checkpoint, tensor by tensor …")
        with Progress(src.checkpoint.nbytes, "proof", "B", progress) as bar:
            src.checkpoint.on_read = bar.update
            try:
                proven = prove_checkpoint(src, onnx_dir, meta, precision)
            finally:
                src.checkpoint.on_read = None
    adapter = "kept in float32" if kind is ExportMode.UNMERGED else "merged"
    if meta.get("quantization") != quantization_description(precision, adapter):
        proven.proof.claims.append("loraexport.json: 'quantization' is not how the export was made")
    if meta.get("model") != model_facts(src.config):  # what a reader acts on: tokens, cache shapes
        proven.proof.claims.append("loraexport.json: 'model' is not what the checkpoint's config says")
    report.proof = proven.proof
    return proven


def _dequantized_parity(report, src, onnx_dir, meta, proven, kind, inputs, path, q, threads, log, records,
                        progress) -> None:  # fmt: skip
    """The export computing in float32 against the layer-streamed reference on the dequantized
    weights, both teacher-forced along ``path``: every prompt position's logits within the
    tolerance, and the same next token at every step of the continuation."""
    from loraexport.verify.streamed import StreamedDecoder

    ids, mask, what = inputs
    t = ids.shape[1]
    with Stage("verify: onnxruntime runs the export computing in float32", records):
        log("verify: onnxruntime runs the export computing in float32 …")
        scratch = float_compute_dir(onnx_dir, meta, inputs_of(src))
        try:
            qf, _ = onnx_outputs(scratch, meta, threads, *path, False, progress, inputs_of(src))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    weights = FileWeights(onnx_dir / "model.onnx", proven.origins["model.onnx"])
    streams = [(torch.float32, True), (torch.float64, True)]
    try:
        with Stage("verify: layer-streamed dequantized reference (float32, float64, one pass)", records):
            log("verify: the layer-streamed reference on the dequantized weights …")
            with ReferenceBar(src, progress, "reference") as bar:
                ref = reference_decoder(StreamedDecoder, src, bar, weights, kind is ExportMode.UNMERGED)
                full = ref.forward(torch.from_numpy(path[0]), torch.from_numpy(path[1]), streams)
    finally:
        weights.close()
    valid = mask.astype(bool)
    d32, d64 = (full[s][:, :t].double().numpy() for s in streams)
    multiple = FUSED_NOISE_MULTIPLE * QUANTIZED_FACTOR  # a quantized graph computing in float32
    parity = compare_outputs("logits", d32, d64, qf[:, :t], valid, multiple)
    chosen = qf[:, t - 1 :].argmax(-1)  # the float-compute twin's next tokens along the path
    generation = generation_result(chosen, full[streams[0]][:, t - 1 :].argmax(-1).numpy())
    result = ParityResult(
        "cpu", [case_result(what, ids, parity)], generation, DEQUANTIZED_REFERENCE, multiple
    )
    diff = (q - qf[:, :t])[valid]
    result.as_written = {
        "what": "the export as written against itself computing in float32",
        "max_abs_diff": float(np.abs(diff).max(initial=0.0)),
        "rms_diff": float(np.sqrt((diff**2).mean())) if diff.size else 0.0,
        "top1_agreement": float((q.argmax(-1) == qf[:, :t].argmax(-1))[valid].mean()),
    }
    report.parity.append(result)


def _base_outputs(src, onnx_dir, meta, precision, kind, threads, ids, mask, log, progress) -> np.ndarray:
    """Q₀: the export with its LoRA coefficients zeroed (kept adapter), or the base exported and
    quantized the same way into a scratch folder beside the output (merged)."""
    td = scratch_dir(onnx_dir, "base", inputs_of(src))
    try:
        if kind is ExportMode.UNMERGED:
            without_adapter(onnx_dir, Path(td))
        else:
            log(f"verify: exporting the base, {precision.value} the same way, to compare with …")
            base = CheckpointSource(src.checkpoint.dir, [], storage=src.storage)
            with Progress(base.checkpoint.nbytes, "base export", "B", progress) as bar:
                base.checkpoint.on_read = bar.update
                write_fused_decoder(base, Path(td) / "model.onnx", precision, streamed=True)
        base_meta = {**meta, "mode": ExportMode.BASE.value}
        q0, _ = onnx_outputs(Path(td), base_meta, threads, ids, mask, False, progress, inputs_of(src))
    finally:
        shutil.rmtree(td, ignore_errors=True)
    return q0


def _quality(report, q, q0, out, streams, valid, generation, precision, kind, what, opts) -> None:
    u = out[streams[0]].double().numpy()
    b = out[streams[1]].double().numpy()
    diff = (q - u)[valid]
    adapter = "kept in float32" if kind is ExportMode.UNMERGED else "merged"
    retained = effect_error = None
    effect = 0.0
    if q0 is not None:
        sums = effect_sums((q - q0)[valid], (u - b)[valid])
        retained, effect_error = adapter_figures(sums)
        effect = float(np.sqrt(sums[1] / diff.size)) if diff.size else 0.0
    cost = QuantCost(
        precision.value,
        adapter,
        float(np.abs(diff).max(initial=0.0)),
        float(np.sqrt((diff**2).mean())) if diff.size else 0.0,
        float((q.argmax(-1) == u.argmax(-1))[valid].mean()),
        generation.agreement,
        effect,
        retained,
        effect_error,
        inputs=f"{what} (against the layer-streamed unmerged reference)",
        positions=int(valid.sum()),
    )
    judge_quality(report, cost, opts, f"{precision.value}, adapter {adapter}")
