"""The layer-streamed reference, in bounded memory: the unmerged model computed layer by layer from
the safetensors (``verify.streamed.StreamedDecoder``: one layer's weights resident at a time),
never at the same time as onnxruntime, which runs the export as usual (the fused graph a few layers
at a time: ``verify.chunked``). Inputs are few and short (``verify.layered``). Each step of the
verify flow (``stages.verify.verify_into``), each one a timed stage of the report:

* proof (quantized): the fused graph written again from the checkpoint and compared with the
  file, tensor by tensor (``stages.prove.prove_checkpoint``), and ``loraexport.json``'s claims;
* parity: a float32 export's logits at every unpadded position against the float32 reference,
  judged against the float64 one's noise floor (with the fused graph's multiple), and greedy tokens
  identical to the reference's. A quantized export computing in float32 against the reference on
  the dequantized weights the proof accepted: onnxruntime decodes greedily once, as written, and
  every reference is teacher-forced along that continuation in the same pass as the prompt — a
  model whose next token at every step is the one chosen decodes the same tokens greedily;
* quality (quantized): the export as written against the unmerged float32 model and the base
  (``verify.quantized``'s figures), Q₀ the graph with its LoRA coefficients at zero or the base
  quantized the same way; judged only under the user's budget;
* latency: not measured (a streamed run's cost is its stages' time and memory).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraexport.core.enums import ExportMode, Precision
from loraexport.core.memory import Stage
from loraexport.core.progress import Progress
from loraexport.errors import InvalidInputError
from loraexport.export.fused import write_fused_decoder
from loraexport.export.quantize import quantization_description, recorded_block
from loraexport.export.streamed import CheckpointSource
from loraexport.models.hf.decoder_config import model_facts
from loraexport.stages.prove import Proven, float_compute_dir, prove_checkpoint
from loraexport.stages.verification import Verification
from loraexport.training.data import read_pairs
from loraexport.verify.chunked import is_fused, scratch_dir
from loraexport.verify.dequantized import DEQUANTIZED_REFERENCE, FileWeights
from loraexport.verify.layered import (
    NEW_TOKENS,
    REFERENCE,
    ReferenceBar,
    case_result,
    generation_result,
    inputs_of,
    onnx_outputs,
    reference_decoder,
    setup_threads,
    streamed_inputs,
    streamed_quality_cost,
    without_adapter,
)
from loraexport.verify.parity import ParityResult, compare_outputs, noise_multiple


@dataclass
class Layered:
    """The checkpoint ``src`` with its adapters, in ``kind`` (base, merged, or unmerged: the
    adapter kept as branches beside the base)."""

    src: CheckpointSource
    kind: ExportMode
    inputs: tuple = ()  # (ids, mask, what they are)
    ran: tuple = ()  # a quantized export's (logits as written, its greedy tokens, the path)

    def setup(self, v: Verification) -> None:
        v.threads, v.providers = setup_threads(v.opts), ["cpu"]
        v.pairs = read_pairs(v.opts.eval_data) if v.opts.eval_data else None
        self.inputs = streamed_inputs(self.src, v.opts.seed, v.sources)

    def prove(self, v: Verification) -> Proven:
        """The proof of a fused export (quantized or float32) against the checkpoint, tensor by tensor."""
        src, onnx_dir, meta = self.src, v.onnx_path, v.meta
        precision = Precision.parse(meta["weights_dtype"])
        if not is_fused(meta):
            raise InvalidInputError(
                f"{onnx_dir}: a quantized export that is not loraexport's fused graph is proven with the "
                "model in memory: give --no-stream"
            )
        with Stage("verify: proof (the export written again from the checkpoint, compared)", v.records):
            v.log("verify: proof: the export written again from the checkpoint, tensor by tensor …")
            with Progress(src.checkpoint.nbytes, "proof", "B", v.progress) as bar:
                src.checkpoint.on_read = bar.update
                try:
                    proven = prove_checkpoint(src, onnx_dir, meta, precision)
                finally:
                    src.checkpoint.on_read = None
        adapter = "kept in float32" if self.kind is ExportMode.UNMERGED else "merged"
        block = recorded_block(meta)
        quantized = quantization_description(precision, adapter, block) if precision.is_quantized else None
        if meta.get("quantization") != quantized:
            proven.proof.claims.append("loraexport.json: 'quantization' is not how the export was made")
        if meta.get("model") != model_facts(
            src.config, src.checkpoint.dir
        ):  # what a reader acts on: tokens, cache shapes
            proven.proof.claims.append("loraexport.json: 'model' is not what the checkpoint's config says")
        return proven

    def _run_export(self, v: Verification, generate: bool):
        ids, mask, _ = self.inputs
        with Stage("verify: onnxruntime runs the export", v.records):
            shape = f"{ids.shape[0]}×{ids.shape[1]}"
            v.log(f"verify: onnxruntime runs the export on {shape} tokens, {NEW_TOKENS} new …")
            return onnx_outputs(
                v.onnx_path, v.meta, v.threads, ids, mask, generate, v.progress, inputs_of(self.src)
            )

    def parity(self, v: Verification, proven: Proven | None) -> None:
        if proven is not None:
            self._dequantized_parity(v, proven)
            return
        from loraexport.verify.streamed import StreamedDecoder

        src, (ids, mask, what) = self.src, self.inputs
        q, got = self._run_export(v, True)
        streams = [(torch.float32, True), (torch.float64, True)]
        with Stage("verify: layer-streamed reference, one pass (float32 + LoRA, float64 + LoRA)", v.records):
            v.log("verify: the layer-streamed reference …")
            with ReferenceBar(src, v.progress, "reference") as bar:
                ref = reference_decoder(StreamedDecoder, src, bar)
                out = ref.forward(torch.from_numpy(ids), torch.from_numpy(mask), streams)
        with Stage(f"verify: layer-streamed reference generates {NEW_TOKENS} tokens", v.records):
            v.log(
                f"verify: the layer-streamed reference generates {NEW_TOKENS} tokens ({NEW_TOKENS} passes) …"
            )
            with ReferenceBar(src, v.progress, "generate") as bar:
                ref = reference_decoder(StreamedDecoder, src, bar)
                want = ref.generate(torch.from_numpy(ids), torch.from_numpy(mask), NEW_TOKENS).numpy()
        u32, u64 = (out[s].double().numpy() for s in streams)
        multiple = noise_multiple(is_fused(v.meta), quantized=False)
        parity = compare_outputs("logits", u32, u64, q, mask.astype(bool), multiple)
        case = case_result(what, ids, parity)
        v.report.parity.append(ParityResult("cpu", [case], generation_result(got, want), REFERENCE, multiple))

    def _dequantized_parity(self, v: Verification, proven: Proven) -> None:
        """The export computing in float32 against the layer-streamed reference on the dequantized
        weights, both teacher-forced along the export's own greedy path: every prompt position's
        logits within the tolerance, and the same next token at every step of the continuation."""
        from loraexport.verify.streamed import StreamedDecoder

        src, onnx_dir, meta, (ids, mask, what) = self.src, v.onnx_path, v.meta, self.inputs
        q, got = self._run_export(v, True)
        # the prompt followed by the export's own greedy tokens: every reference is teacher-forced along it
        path = (
            np.concatenate([ids, got[:, :-1]], axis=1),
            np.concatenate([mask, np.ones_like(got[:, :-1])], axis=1),
        )
        self.ran = (q, got, path)
        t = ids.shape[1]
        with Stage("verify: onnxruntime runs the export computing in float32", v.records):
            v.log("verify: onnxruntime runs the export computing in float32 …")
            scratch = float_compute_dir(onnx_dir, meta, inputs_of(src))
            try:
                qf, _ = onnx_outputs(scratch, meta, v.threads, *path, False, v.progress, inputs_of(src))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        weights = FileWeights(onnx_dir / "model.onnx", proven.origins["model.onnx"])
        streams = [(torch.float32, True), (torch.float64, True)]
        try:
            with Stage(
                "verify: layer-streamed dequantized reference (float32, float64, one pass)", v.records
            ):
                v.log("verify: the layer-streamed reference on the dequantized weights …")
                with ReferenceBar(src, v.progress, "reference") as bar:
                    ref = reference_decoder(
                        StreamedDecoder, src, bar, weights, self.kind is ExportMode.UNMERGED
                    )
                    full = ref.forward(torch.from_numpy(path[0]), torch.from_numpy(path[1]), streams)
        finally:
            weights.close()
        valid = mask.astype(bool)
        d32, d64 = (full[s][:, :t].double().numpy() for s in streams)
        multiple = noise_multiple(fused=True, quantized=True)  # proven: loraexport's fused graph
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
        v.report.parity.append(result)

    def quality(self, v: Verification, proven: Proven | None) -> None:
        """A quantized export as written against the layer-streamed unmerged float32 model and the
        base, along its own greedy path."""
        if proven is None:
            return
        from loraexport.verify.streamed import StreamedDecoder

        src, (ids, mask, what), (q, got, path) = self.src, self.inputs, self.ran
        precision = Precision.parse(v.meta["weights_dtype"])
        t = ids.shape[1]
        q0 = None
        if src.adapters:
            with Stage("verify: the export without the adapter (Q0)", v.records):
                q0 = self._base_outputs(v, precision)
        streams = [(torch.float32, True), (torch.float32, False)]
        with Stage("verify: layer-streamed reference, one pass (float32 + LoRA, float32 base)", v.records):
            v.log("verify: the layer-streamed unmerged reference, along the export's greedy tokens …")
            with ReferenceBar(src, v.progress, "reference") as bar:
                ref = reference_decoder(StreamedDecoder, src, bar)
                full = ref.forward(torch.from_numpy(path[0]), torch.from_numpy(path[1]), streams)
        want = full[streams[0]][:, t - 1 :].argmax(-1).numpy()  # the unmerged model's next tokens along it
        out = {s: o[:, :t] for s, o in full.items()}
        valid, generation = mask.astype(bool), generation_result(got, want)
        cost = streamed_quality_cost(q, q0, out, streams, valid, generation, precision, self.kind, what)
        v.judge(cost, f"{precision.value}, adapter {cost.adapter}")

    def _base_outputs(self, v: Verification, precision: Precision) -> np.ndarray:
        """Q₀: the export with its LoRA coefficients zeroed (kept adapter), or the base exported and
        quantized the same way into a scratch folder beside the output (merged)."""
        src, onnx_dir, (ids, mask, _) = self.src, v.onnx_path, self.inputs
        td = scratch_dir(onnx_dir, "base", inputs_of(src))
        try:
            if self.kind is ExportMode.UNMERGED:
                without_adapter(onnx_dir, Path(td))
            else:
                v.log(f"verify: exporting the base, {precision.value} the same way, to compare with …")
                base = CheckpointSource(src.checkpoint.dir, [], storage=src.storage)
                with Progress(base.checkpoint.nbytes, "base export", "B", v.progress) as bar:
                    base.checkpoint.on_read = bar.update
                    write_fused_decoder(base, Path(td) / "model.onnx", precision, streamed=True)
            base_meta = {**v.meta, "mode": ExportMode.BASE.value}
            q0, _ = onnx_outputs(Path(td), base_meta, v.threads, ids, mask, False, v.progress, inputs_of(src))
        finally:
            shutil.rmtree(td, ignore_errors=True)
        return q0

    def latency(self, v: Verification) -> None:
        pass

    def close(self) -> None:
        pass
