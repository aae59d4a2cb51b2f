"""Verification of a quantized export of a model in memory, in the order a reader needs it:

1. proof: the file holds exactly the quantization of the reference weights (``stages.prove``);
2. parity: the reference running the dequantized weights the proof accepted (PyTorch) against the
   export computing in float32 (onnxruntime), judged as any float32 export is
   (``verify.parity``); what the kernels' int8 activations add is measured beside it;
3. quality: what quantizing costs against the unmerged float32 model (``verify.quantized``),
   judged only under the user's budget (``verify.gates``).
Adapter mode and the streamed path use the same steps (``dequantized_reference``, ``judge_quality``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from loraexport.core.enums import ExportMode, Precision
from loraexport.errors import InvalidInputError
from loraexport.report.contents import Report
from loraexport.runtime.model import RuntimeInputError
from loraexport.spec import ExportSpec
from loraexport.stages.graphs import describe, export_model, torch_exporter_of
from loraexport.stages.inputs import Loaded
from loraexport.stages.merge import unmerged_model
from loraexport.stages.prove import Proven, float_compute_dir, graph_files, prove_export
from loraexport.stages.verification import Verification
from loraexport.verify import gates
from loraexport.verify.dequantized import as_written, dequantized_copy, dequantized_weights
from loraexport.verify.latency import open_model
from loraexport.verify.options import VerifyOptions
from loraexport.verify.parity_on import parity_on
from loraexport.verify.quantized import QuantCost, quantization_cost

DEQUANTIZED_REFERENCE = (
    "the reference with the dequantized weights the proof accepted, in PyTorch float32 (float64 for "
    "the noise floor), against the export computing in float32 (MatMulNBits at accuracy level 0, "
    "quantize_dynamic's products as MatMul of DequantizeLinear): the same weights on both sides"
)


def dequantized_reference(
    proven: Proven, onnx_dir: Path, meta: dict, model: nn.Module | None = None
) -> nn.Module:
    """``model`` (default: the proof's reference) with every quantized module's weight replaced by
    the float values the file's proven tensors stand for."""
    weights: dict = {}
    for name in graph_files(meta):
        for module, value in dequantized_weights(onnx_dir / name, proven.origins.get(name, {})).items():
            if module in weights and not torch.equal(weights[module], value):
                raise InvalidInputError(f"{module} is quantized differently in two graphs of {onnx_dir}")
            weights[module] = value
    target = model if model is not None else proven.subject.model
    if model is not None:  # adapter mode: the probe model's base layers are the base's modules
        weights = {k.removesuffix(".base_layer"): v for k, v in weights.items()}
    return dequantized_copy(target, weights)


def verify_quantized(v: Verification, loaded: Loaded) -> None:
    """Proof, parity against the dequantized reference (per provider), then quality. ``v.made``:
    the float graphs this run exported, which the proof quantizes again (``stages.prove``)."""
    report, onnx_path, meta, opts, log = v.report, v.onnx_path, v.meta, v.opts, v.log
    providers, threads, pairs, made = v.providers, v.threads, v.pairs, v.made
    quant = Precision.parse(meta["weights_dtype"])
    sources = [s for s, _ in pairs] if pairs else None
    proven = prove_export(loaded, onnx_path, meta, log, made)
    report.proof = proven.proof
    if not proven.proof.passed:
        log("proof: the export is not the reference's quantization; parity and quality are not measured")
        return
    reference = dequantized_reference(proven, onnx_path, meta)
    scratch = float_compute_dir(onnx_path, meta, _inputs(loaded))
    try:
        for provider in providers:
            log(f"parity [{provider}]: {opts.samples} cases against the dequantized reference …")
            try:
                opener = lambda p=provider: open_model(scratch, p, threads, meta)  # noqa: E731
                result = parity_on(
                    loaded.family, reference, opener, opts, pairs, loaded.tokenizer, quantized=True
                )
                result.reference = DEQUANTIZED_REFERENCE
                result.as_written = as_written(
                    loaded.family,
                    reference,
                    open_model(onnx_path, provider, threads, meta),
                    open_model(scratch, provider, threads, meta),
                    opts.samples,
                    opts.seed,
                )
            except RuntimeInputError as e:  # the export does not run on this model's inputs
                raise InvalidInputError(str(e)) from e
            report.parity.append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    del reference
    _quality(report, loaded, onnx_path, meta, quant, opts, log, sources, threads)


def _inputs(loaded: Loaded) -> tuple[Path, ...]:
    return tuple(Path(a.path) for a in loaded.adapters if a.path is not None)


def _quality(report, loaded, onnx_path, meta, quant, opts, log, sources, threads) -> None:
    """What the quantized export keeps of the unmerged float32 model and of the adapter
    (``verify.quantized``): the base is exported and quantized the same way to compare with."""
    unmerged = unmerged_model(loaded.base, loaded.adapters, loaded.weights)
    adapter = meta.get("quantization", {}).get("adapter", "merged")
    log(f"quality: the {quant.value} export against the unmerged float32 model …")
    with tempfile.TemporaryDirectory(prefix="loraexport-quantized-base-") as td:
        log(f"exporting the base, quantized to {quant.value} the same way, for comparison …")
        how = ExportSpec.of_graph(quant, optimize="optimize" in meta, exporter=torch_exporter_of(meta))
        result = export_model(loaded.family, loaded.base, Path(td), how)
        base_meta = describe(loaded.family, loaded.base, result, quant, ExportMode.BASE)
        try:
            cost = quantization_cost(
                loaded.family, loaded.base, unmerged, open_model(onnx_path, "cpu", threads, meta),
                open_model(Path(td), "cpu", threads, base_meta), quant.value, adapter, seed=opts.seed,
                samples=opts.samples, sources=sources, tokenizer=loaded.tokenizer,
            )  # fmt: skip
        except RuntimeInputError as e:  # the export does not run on this model's inputs
            raise InvalidInputError(str(e)) from e
    judge_quality(report, cost, opts, f"{quant.value}, adapter {adapter}")


def judge_quality(report: Report, cost: QuantCost, opts: VerifyOptions, where: str) -> None:
    """Record ``cost``; the user's budget makes it a gate; else a lost adapter is only said."""
    report.quantization.append(cost)
    report.budget = opts.budget
    report.quantization_failures += gates.quality_failures(cost, opts.budget, where)
    warning = None if opts.budget.set else gates.lost_adapter_warning(cost)
    if warning is not None:
        report.warnings.append(warning)
