"""The reference of an adapter-mode export (``--mode adapter``): each adapter, active in the one
graph, against its own unmerged PyTorch model; the graph with no adapter active against the base.
Each step of the verify flow (``stages.verify.verify_into``):

* proof (a quantized base): weight by weight with every adapter file (``stages.prove``);
* parity, per provider and adapter: float32 against each unmerged model; a quantized base computing
  in float32 against each unmerged model on the dequantized base;
* quality (quantized): what quantizing costs, each adapter as ``verify.quantized`` judges a kept
  one (Q₀: the same graph with no adapter active);
* latency: what loading and activating an adapter costs, and the graph against the merged export
  and the base (``verify.adapters``).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode, Precision, half_precision, quantization
from loraexport.core.io import sha256_file
from loraexport.errors import InvalidInputError
from loraexport.export.adapter import ADAPTER_SUFFIX, GraphLora, write_adapter_file
from loraexport.export.adapter_files import NO_ADAPTER, adapter_file_tensors, file_name
from loraexport.export.quantize import recorded_block
from loraexport.runtime.adapters import Active, find_adapters
from loraexport.runtime.model import RuntimeInputError
from loraexport.spec import ExportSpec
from loraexport.stages.graphs import describe, export_model, torch_exporter_of
from loraexport.stages.inputs import Loaded, Log
from loraexport.stages.merge import merged_model, unmerged_model
from loraexport.stages.prove import Proven, dequantized_reference, float_compute_dir, prove_export
from loraexport.stages.references.in_memory import setup_in_memory
from loraexport.stages.verification import Verification
from loraexport.verify.adapters import AdapterLatency, AdapterModeResult, AdapterTiming
from loraexport.verify.dequantized import DEQUANTIZED_REFERENCE
from loraexport.verify.latency import open_model, time_interleaved
from loraexport.verify.parity import check_parity
from loraexport.verify.quantized import quantization_cost

LATENCY_SHAPES = ((1, 32), (4, 32))
REPEATS = 15  # interleaved rounds per timing (fewer when one takes over twice TIMING_BUDGET_S)
TIMING_BUDGET_S = 2.0


def adapter_files(
    loaded: Loaded, graph: GraphLora, directory: Path, meta: dict, scratch: Path
) -> list[tuple[str, Path]]:
    """(name, file) per adapter of ``loaded``: the export's own file for an adapter it was made
    from (``source_sha256`` of the PEFT folder), else the adapter converted into ``scratch`` (so
    the conversion is checked too)."""
    try:
        found = find_adapters(directory, meta)  # names and files checked: plain names inside it
    except RuntimeInputError as e:
        raise InvalidInputError(str(e)) from e
    listed = [e for e in meta.get("adapter_files") or [] if isinstance(e, dict) and e.get("name") in found]
    by_source = {e.get("source_sha256"): e["name"] for e in listed if isinstance(e.get("source_sha256"), str)}
    out, taken = [], {f"{n}{ADAPTER_SUFFIX}" for n in (*found, NO_ADAPTER)}
    stored_used: set[str] = set()
    for i, adapter in enumerate(loaded.adapters):
        name = by_source.get(adapter.sha256() if adapter.path is not None else None)
        if name is not None and name not in stored_used:  # the export's own file, named by it
            stored_used.add(name)
            out.append((name, found[name]))
            continue
        path = scratch / f"{i}{ADAPTER_SUFFIX}"
        write_adapter_file(adapter_file_tensors(adapter, graph), path)
        out.append((file_name(adapter, taken)[: -len(ADAPTER_SUFFIX)], path))  # unique, never "none"
    return out


@dataclass
class Adapters:
    """Each adapter of ``loaded`` against its own unmerged model. ``half`` (a --dtype export): the
    references' base weights are rounded to it, as the file stores them; the adapters stay float32
    on both sides."""

    loaded: Loaded
    half: Precision | None = None
    files: list[tuple[str, Path]] = field(default_factory=list)  # (name, adapter file) per adapter
    graph: GraphLora | None = None
    scratch: Path | None = None

    def setup(self, v: Verification) -> None:
        setup_in_memory(v, self.loaded)
        self.graph = GraphLora.from_meta(v.meta, str(v.onnx_path))
        if not self.loaded.adapters:
            raise InvalidInputError(
                f"{v.onnx_path} is an adapter-mode export: give the --adapter(s) to check"
            )
        if self.half is not None:
            base = merged_model(self.loaded.base, [], storage_dtype=torch_dtype(self.half))[0]
            self.loaded = dataclasses.replace(self.loaded, base=base)
        self.scratch = Path(tempfile.mkdtemp(prefix="loraexport-adapters-"))
        self.files = adapter_files(self.loaded, self.graph, v.onnx_path, v.meta, self.scratch)

    def prove(self, v: Verification) -> Proven:
        return prove_export(self.loaded, v.onnx_path, v.meta, v.log)

    def parity(self, v: Verification, proven: Proven | None) -> None:
        loaded, onnx_path, meta = self.loaded, v.onnx_path, v.meta
        if proven is None:
            for provider in v.providers:
                _parity_each(v, loaded, loaded.base, onnx_path, provider, self.files)
            return
        base = dequantized_reference(proven, onnx_path, meta, model=loaded.base)
        scratch = float_compute_dir(onnx_path, meta, tuple(Path(a.path) for a in loaded.adapters if a.path))
        try:  # the graph computing in float32, on the base the proof accepted
            for provider in v.providers:
                _parity_each(v, loaded, base, scratch, provider, self.files)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for result in v.report.parity:
            result.reference = f"{result.reference}; {DEQUANTIZED_REFERENCE}"

    def quality(self, v: Verification, proven: Proven | None) -> None:
        """A quantized base: what quantizing costs, each adapter as a kept one is judged."""
        if proven is None:
            return
        loaded, opts, threads, meta = self.loaded, v.opts, v.threads, v.meta
        quant = quantization(meta.get("weights_dtype"))
        for (name, file), adapter in zip(self.files, loaded.adapters, strict=True):
            v.log(f"quality [adapter {name}]: against its unmerged float32 model …")
            try:
                cost = quantization_cost(
                    loaded.family,
                    loaded.base,
                    unmerged_model(loaded.base, adapter),
                    open_model(v.onnx_path, "cpu", threads, meta, file),
                    open_model(v.onnx_path, "cpu", threads, meta),
                    quant.value,
                    f"{name}: kept in float32 (adapter mode)",
                    seed=opts.seed,
                    samples=opts.samples,
                    sources=v.sources,
                    tokenizer=loaded.tokenizer,
                )
            except RuntimeInputError as e:
                raise InvalidInputError(str(e)) from e
            v.judge(cost, f"adapter {name}")

    def latency(self, v: Verification) -> None:
        v.report.adapter_mode = AdapterModeResult(self.graph.rank)
        result, exporter = v.report.adapter_mode, torch_exporter_of(v.meta)
        _timings(
            result, self.loaded, v.onnx_path, v.meta, self.files, v.threads, v.opts.latency, v.log, exporter
        )

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _parity_each(v: Verification, loaded: Loaded, base, onnx_path: Path, provider: str, files) -> None:
    """Each adapter against its own unmerged model on ``base``, then no adapter against ``base``."""
    report, meta, opts, log, threads, sources = v.report, v.meta, v.opts, v.log, v.threads, v.sources
    cases = [(n, f, unmerged_model(base, a)) for (n, f), a in zip(files, loaded.adapters, strict=True)]
    cases.append((NO_ADAPTER, None, base))
    for name, file, reference in cases:
        log(f"parity [{provider}, adapter {name}]: {opts.samples} cases …")
        try:
            result = check_parity(
                loaded.family,
                reference,
                lambda p=provider, f=file: open_model(onnx_path, p, threads, meta, f),
                samples=opts.samples,
                seed=opts.seed,
                sources=sources,
                tokenizer=loaded.tokenizer,
                quantized=quantization(meta.get("weights_dtype")) is not None,  # the float-compute twin
            )
        except RuntimeInputError as e:
            raise InvalidInputError(str(e)) from e
        result.provider = f"{provider}, adapter {name}"
        if file is None:
            result.reference = (
                "the base model in PyTorch float32 (no adapter active); float64 for the noise floor"
            )
        else:
            result.reference = (
                f"adapter {name}'s own unmerged PyTorch model, float32 (base + its LoRA branches); "
                "float64 for the noise floor"
            )
        report.parity.append(result)


def _timings(result, loaded, onnx_path, meta, files, threads, latency: bool, log: Log, exporter) -> None:
    model = open_model(onnx_path, "cpu", threads, meta)
    x = {k: v.numpy() for k, v in loaded.family.latency_inputs(loaded.base, 1, 16).items()}
    for name, file in files:
        t = time.perf_counter()
        Active(file)
        load_ms = (time.perf_counter() - t) * 1e3
        med = _medians_ms(
            {
                "with": lambda f=file: model.forward(**x, adapter=f),
                "none": lambda: model.forward(**x),
            }
        )
        result.adapters.append(
            AdapterTiming(name, file.name, sha256_file(file), load_ms, med["with"] - med["none"])
        )
    if not latency:
        return
    log("latency: adapter mode against the merged export and the base …")
    optimize = "optimize" in meta
    with tempfile.TemporaryDirectory(prefix="loraexport-adapter-latency-") as td:
        dirs = {}
        # exported as this export was: the same graph kind and weights (half: the base is
        # already rounded, and the merge is rounded the same way; quantized: quantized alike)
        precision = half_precision(meta.get("weights_dtype")) or quantization(meta.get("weights_dtype"))
        storage = torch_dtype(half_precision(meta.get("weights_dtype")))
        block = recorded_block(meta)
        merged = merged_model(loaded.base, loaded.adapters[:1], storage_dtype=storage)[0]
        for key, m, mode in (("merged", merged, ExportMode.MERGED), ("base", loaded.base, ExportMode.BASE)):
            d = Path(td) / key
            d.mkdir()
            res = export_model(
                loaded.family,
                m,
                d,
                ExportSpec.of_graph(precision, optimize=optimize, exporter=exporter, block_size=block),
            )
            dirs[key] = open_model(d, "cpu", threads, describe(loaded.family, m, res, precision, mode, block))
        first = files[0][1]
        for batch, seq in LATENCY_SHAPES:
            args = {k: v.numpy() for k, v in loaded.family.latency_inputs(loaded.base, batch, seq).items()}
            med = _medians_ms(
                {
                    "adapter": lambda a=args: model.forward(**a, adapter=first),
                    "merged": lambda a=args: dirs["merged"].forward(**a),
                    "base": lambda a=args: dirs["base"].forward(**a),
                }
            )
            result.latency.append(AdapterLatency(batch, seq, med["adapter"], med["merged"], med["base"]))


def _medians_ms(variants: dict) -> dict[str, float]:
    """Median milliseconds of each variant, timed interleaved (``verify.latency``)."""
    stats = time_interleaved(variants, min_runs=REPEATS, max_runs=REPEATS, budget_s=TIMING_BUDGET_S)
    return {name: s.p50_ms for name, s in stats.items()}
