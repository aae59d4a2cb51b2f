"""The reference in memory, for a merged, unmerged or base export: the base and adapters
unmerged in PyTorch (float32, and float64 for the noise floor), and the merged model the export
was made from. Each step of the verify flow (``stages.verify.verify_into``):

* proof (quantized): ``stages.prove.prove_export``;
* parity, per provider: against the unmerged model (float32 export; the noise floor also counts
  the file's own rounded weights), the merged model rounded as the file stores it (half), or the
  reference running the dequantized weights the proof accepted (quantized, the export computing in
  float32; what the kernels' int8 activations add is measured beside it);
* quality: what quantizing costs against the unmerged float32 model (``verify.quantized``), and
  what storing the merged weights in each half precision asked for costs (``verify.half``);
* latency: the export against the base's and the unmerged model's graphs, exported as it was,
  and torch (``verify.latency``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
from torch import nn

from loraexport.core import threads as torch_threads
from loraexport.core.enums import ExportMode, Precision
from loraexport.errors import InvalidInputError
from loraexport.export.quantize import recorded_block
from loraexport.runtime.model import PROVIDERS, RuntimeInputError
from loraexport.spec import ExportSpec
from loraexport.stages.graphs import describe, export_model, torch_exporter_of
from loraexport.stages.inputs import Loaded
from loraexport.stages.merge import unmerged_model
from loraexport.stages.prove import Proven, dequantized_reference, float_compute_dir, prove_export
from loraexport.stages.verification import Verification
from loraexport.training.data import read_pairs
from loraexport.verify import gates
from loraexport.verify.dequantized import DEQUANTIZED_REFERENCE, as_written
from loraexport.verify.half import half_precision_costs
from loraexport.verify.latency import measure_latency, open_model
from loraexport.verify.parity import check_described_model
from loraexport.verify.parity_on import parity_on
from loraexport.verify.quantized import quantization_cost
from loraexport.verify.stored import STORED_EPS, stored_weights_error


def setup_in_memory(v: Verification, loaded: Loaded) -> None:
    """The providers (``resolve_providers``), torch's threads for this model's size
    (``core.threads``) and the --eval-data pairs of a verification in memory."""
    v.providers = resolve_providers(v.opts.providers)
    v.threads = torch_threads.use(sum(p.numel() for p in loaded.base.parameters()), v.opts.threads, v.log)
    v.pairs = read_pairs(v.opts.eval_data) if v.opts.eval_data else None
    try:  # an export of another model is refused as such (exit 3), before the proof says it differs
        check_described_model(loaded.family.runtime_meta(loaded.base), v.onnx_path, v.meta)
    except RuntimeInputError as e:
        raise InvalidInputError(str(e)) from e


@dataclass
class InMemory:
    """``loaded`` unmerged in torch; ``merged``: the merged model the export was made from, its
    weights rounded to ``half`` when the export stores them so."""

    loaded: Loaded
    merged: nn.Module
    half: Precision | None = None
    unmerged: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.unmerged = unmerged_model(self.loaded.base, self.loaded.adapters, self.loaded.weights)

    def setup(self, v: Verification) -> None:
        setup_in_memory(v, self.loaded)

    def prove(self, v: Verification) -> Proven:
        return prove_export(self.loaded, v.onnx_path, v.meta, v.log, v.made)

    def parity(self, v: Verification, proven: Proven | None) -> None:
        if proven is not None:
            self._dequantized_parity(v, proven)
            return
        report, onnx_path, meta, opts, log, loaded = v.report, v.onnx_path, v.meta, v.opts, v.log, self.loaded
        half, merged, unmerged = self.half, self.merged, self.unmerged
        reference = merged if half else unmerged
        what = f"the {half.value}-rounded merged model" if half else "the unmerged model"
        stored = _stored(meta, half, unmerged, merged)
        for provider in v.providers:
            log(f"parity [{provider}]: {opts.samples} cases against {what} (float32 and float64) …")
            # Opened inside and closed before the torch runs: never the session and the float64
            # model at once (memory stays near twice the weights).
            opener = lambda p=provider: open_model(onnx_path, p, v.threads, meta)  # noqa: E731
            result = parity_on(
                loaded.family, reference, opener, opts, v.pairs, loaded.tokenizer, stored=stored
            )
            if stored is not None:
                result.reference += (
                    "; the noise floor also counts torch float32 on the file's own weights (the merge "
                    "rounded once to float32, checked against the unmerged layers in float64)"
                )
            if half:
                result.reference = (
                    f"the merged model with its weights rounded to {half.value} (what the file stores), "
                    "in PyTorch float32; float64 for the noise floor. What the rounding costs against the "
                    "unmerged model: see Half precision"
                )
            report.parity.append(result)

    def _dequantized_parity(self, v: Verification, proven: Proven) -> None:
        """The export computing in float32 against the reference on the weights the proof accepted."""
        report, onnx_path, meta, opts, log, loaded = v.report, v.onnx_path, v.meta, v.opts, v.log, self.loaded
        reference = dequantized_reference(proven, onnx_path, meta)
        avoid = tuple(Path(a.path) for a in loaded.adapters if a.path is not None)
        scratch = float_compute_dir(onnx_path, meta, avoid)
        try:
            for provider in v.providers:
                log(f"parity [{provider}]: {opts.samples} cases against the dequantized reference …")
                try:
                    opener = lambda p=provider: open_model(scratch, p, v.threads, meta)  # noqa: E731
                    result = parity_on(
                        loaded.family, reference, opener, opts, v.pairs, loaded.tokenizer, quantized=True
                    )
                    result.reference = DEQUANTIZED_REFERENCE
                    result.as_written = as_written(
                        loaded.family,
                        reference,
                        open_model(onnx_path, provider, v.threads, meta),
                        open_model(scratch, provider, v.threads, meta),
                        opts.samples,
                        opts.seed,
                    )
                except RuntimeInputError as e:  # the export does not run on this model's inputs
                    raise InvalidInputError(str(e)) from e
                report.parity.append(result)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def quality(self, v: Verification, proven: Proven | None) -> None:
        if proven is not None:
            _quality(v, self.loaded, Precision.parse(v.meta["weights_dtype"]))
        _half_costs(v.report, self.loaded, self.merged, self.unmerged, v.opts, v.log, self.half, v.sources)

    def latency(self, v: Verification) -> None:
        if v.opts.latency:
            checked = (v.onnx_path, v.meta)
            _latency(
                v.report,
                self.loaded,
                self.merged,
                self.unmerged,
                checked,
                v.opts,
                v.log,
                v.providers,
                v.threads,
            )

    def close(self) -> None:
        pass


def resolve_providers(requested: list[str] | None) -> list[str]:
    """CPU always; CUDA too when onnxruntime has it. An explicit but unavailable one is an error."""
    available = ort.get_available_providers()
    if not requested:
        return ["cpu"] + (["cuda"] if PROVIDERS["cuda"] in available else [])
    for p in requested:
        if p not in PROVIDERS:
            raise InvalidInputError(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
        if PROVIDERS[p] not in available:
            raise InvalidInputError(f"provider {p!r} requested but onnxruntime has no {PROVIDERS[p]} here")
    return list(dict.fromkeys(requested))


def _stored(meta: dict, half, unmerged: nn.Module, merged: nn.Module) -> nn.Module | None:
    """The merged float32 model whose weights a merged float32 export stores, when they are the
    correctly rounded merge of the unmerged reference (``verify.stored``); else None."""
    if half or meta.get("mode") != ExportMode.MERGED.value or merged is None:
        return None
    return merged if stored_weights_error(unmerged, merged) <= STORED_EPS else None


def _quality(v: Verification, loaded: Loaded, quant: Precision) -> None:
    """What the quantized export keeps of the unmerged float32 model and of the adapter
    (``verify.quantized``): the base is exported and quantized the same way to compare with."""
    onnx_path, meta, opts, log, sources, threads = v.onnx_path, v.meta, v.opts, v.log, v.sources, v.threads
    unmerged = unmerged_model(loaded.base, loaded.adapters, loaded.weights)
    adapter = meta.get("quantization", {}).get("adapter", "merged")
    log(f"quality: the {quant.value} export against the unmerged float32 model …")
    with tempfile.TemporaryDirectory(prefix="loraexport-quantized-base-") as td:
        log(f"exporting the base, quantized to {quant.value} the same way, for comparison …")
        block = recorded_block(meta)
        how = ExportSpec.of_graph(
            quant, optimize="optimize" in meta, exporter=torch_exporter_of(meta), block_size=block
        )
        result = export_model(loaded.family, loaded.base, Path(td), how)
        base_meta = describe(loaded.family, loaded.base, result, quant, ExportMode.BASE, block)
        try:
            cost = quantization_cost(
                loaded.family, loaded.base, unmerged, open_model(onnx_path, "cpu", threads, meta),
                open_model(Path(td), "cpu", threads, base_meta), quant.value, adapter, seed=opts.seed,
                samples=opts.samples, sources=sources, tokenizer=loaded.tokenizer,
            )  # fmt: skip
        except RuntimeInputError as e:  # the export does not run on this model's inputs
            raise InvalidInputError(str(e)) from e
    v.judge(cost, f"{quant.value}, adapter {adapter}")


def _half_costs(report, loaded, merged, unmerged, opts, log, half, sources) -> None:
    """What storing the merged weights in each half precision asked for (and the stored one) costs."""
    dtypes = tuple(dict.fromkeys((*opts.half, *([half.value] if half else []))))
    for dtype in dtypes:
        log(f"half precision: what storing the merged weights in {dtype} costs …")
        stored = half is not None and dtype == half.value  # ``merged`` holds these rounded weights
        cast_err = max((m.cast_max_rel_err for m in report.merge.modules), default=0.0) if stored else None
        rows = half_precision_costs(
            loaded.family,
            loaded.base,
            loaded.adapters,
            loaded.weights,
            unmerged,
            dtype,
            merged=merged if stored else None,
            max_cast_rel_err=cast_err,
            seed=opts.seed,
            samples=opts.samples,
            sources=sources,
            tokenizer=loaded.tokenizer,
        )
        report.half.extend(rows)
        failure = gates.half_failure(rows[0].adapter_retained, dtype, opts.budget) if stored else None
        if failure is not None:
            report.half_failures.append(failure)


def _latency(report, loaded, merged, unmerged, checked, opts, log, providers, threads) -> None:
    """Latency of the export (``checked``: its folder and description) against the base's and
    the unmerged model's graphs, exported as it was, and torch."""
    exporter, optimize = torch_exporter_of(checked[1]), "optimize" in checked[1]
    with tempfile.TemporaryDirectory(prefix="loraexport-latency-") as td:
        dirs = {"onnx_merged": checked}
        for name, model, mode in (
            ("onnx_base", loaded.base, ExportMode.BASE),
            ("onnx_unmerged", unmerged, ExportMode.UNMERGED),
        ):
            log(f"exporting {name.removeprefix('onnx_')} model for comparison …")
            d = Path(td) / name
            d.mkdir()
            result = export_model(
                loaded.family, model, d, ExportSpec.of_graph(optimize=optimize, exporter=exporter)
            )
            dirs[name] = (d, describe(loaded.family, model, result, None, mode))
        torch_models = {"torch_unmerged": unmerged, "torch_merged": merged}
        for provider in providers:
            report.latency.append(
                measure_latency(
                    loaded.family,
                    provider,
                    threads,
                    torch_models,
                    dirs,
                    log,
                    opts.latency_budget_s,
                    opts.latency_points,
                )
            )
