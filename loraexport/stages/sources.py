"""Where the export flow (``stages.export.write_export``) reads an export's weights: a ``Source``.

* ``FromModel``: the model built in torch (``load_inputs``; merged, unmerged or adapter mode, the
  subject ``stages.graphs`` makes), exported with torch.onnx or the fused writer;
* ``FromCheckpoint``: the checkpoint read tensor by tensor (``export.streamed``), the fused
  decoder graph written as each weight is read, merged in float64 per tensor or with the adapter
  kept as branches; no model object is built, so memory stays bounded (Llama, Mistral, Qwen2).
  Each step's wall time and peak resident memory go into the report (``core.memory.Stage``).

Both give the same four things to the flow: ``write`` (the graphs and their description, through
``artifact.provenance``), ``inputs`` (what made the export), ``report`` (a new report of the
export) and ``finish`` (what the run cost, into the report).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraexport.artifact.provenance import export_description
from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode, Precision
from loraexport.core.memory import Stage, StageRecord
from loraexport.core.progress import Progress
from loraexport.errors import UnsupportedAdapterError
from loraexport.export.fused import write_fused_decoder
from loraexport.export.onnx import ExportResult
from loraexport.export.optimize import fused_result
from loraexport.export.streamed import CheckpointSource
from loraexport.lora.adapter import Adapter
from loraexport.lora.merge import MergeStats
from loraexport.lora.weights import check_dora
from loraexport.models.base import ModelFamily
from loraexport.models.hf.decoder_config import model_facts
from loraexport.models.registry import detect_family
from loraexport.report.contents import Report
from loraexport.spec import ExportSpec, Run
from loraexport.stages.graphs import Subject, describe_quantization, export_into
from loraexport.stages.inputs import (
    Loaded,
    Log,
    adapter_info,
    adapter_provenance,
    base_info,
    check_weights,
    machine,
    model_provenance,
)
from loraexport.stages.residency import memory_facts


@dataclass
class FromModel:
    """An export of the model in memory: ``subject`` of ``loaded`` (``stages.graphs``)."""

    path: Path
    loaded: Loaded
    subject: Subject
    stats: MergeStats | None = None  # the merge that made ``subject``, for the report

    @property
    def family(self) -> ModelFamily:
        return self.loaded.family

    @property
    def avoid(self) -> tuple[Path, ...]:
        """The folders the inputs are in (no scratch folder is made inside them)."""
        return (self.path, *(Path(a.path) for a in self.loaded.adapters if a.path is not None))

    def stage(self, what: str):
        return nullcontext()

    def write(self, tmp: Path, meta: dict, spec: ExportSpec, log: Log, on_float=None) -> ExportResult:
        log(f"exporting to ONNX ({spec.exporter or self.family.exporter} exporter) …")
        result = export_into(self.loaded, self.subject, tmp, meta, spec, on_float=on_float)
        log(f"exported {', '.join(result.files)} in {result.seconds:.1f} s")
        return result

    def inputs(self, key: str, digest: str) -> dict:
        """loraexport.json's ``inputs``: the model folder under ``key`` (``digest``: its sha256_dir)
        and the adapters."""
        out = {key: model_provenance(self.path, digest)}
        if self.loaded.adapters:
            out["adapters"] = adapter_provenance(self.loaded)
        return out

    def report(self, result: ExportResult | None) -> Report:
        return model_report(self.path, self.loaded, self.stats, result)

    def finish(self, report: Report) -> None:
        pass


@dataclass
class FromCheckpoint:
    """An export written from the checkpoint ``src``, tensor by tensor, in ``mode`` (base,
    merged, or unmerged: the adapter kept as float32 branches)."""

    path: Path
    src: CheckpointSource
    mode: ExportMode
    show_progress: bool = False
    records: list[StageRecord] = field(default_factory=list)  # each step's time and memory

    @property
    def family(self) -> ModelFamily:
        return detect_family(self.path)

    @property
    def avoid(self) -> tuple[Path, ...]:
        return (self.src.checkpoint.dir, *(Path(a.path) for a in self.src.adapters if a.path is not None))

    def stage(self, what: str):
        return Stage(what, self.records)

    def write(self, tmp: Path, meta: dict, spec: ExportSpec, log: Log, on_float=None) -> ExportResult:
        precision = spec.precision
        how = (
            "adapter kept as float32 branches"
            if self.mode is ExportMode.UNMERGED
            else "merged in float64 per tensor"
        )
        log(f"exporting {self.path} streamed ({precision.value}, {how}) …")
        with self.stage(f"export, streamed ({precision.value}; {how})"):
            result = write_streamed(self.src, tmp, precision, log, self.show_progress, spec.block_size)
        facts = model_facts(self.src.config, self.src.checkpoint.dir)
        meta.update(export_description(facts, result, precision.value, self.mode.value, streamed=True))
        meta.update(describe_quantization(precision, self.mode, spec.block_size))
        return result

    def inputs(self, key: str, digest: str) -> dict:
        out = {key: model_provenance(self.path, digest)}
        if self.src.adapters:
            out["adapters"] = [
                {"path": str(a.path), "sha256": a.sha256(), "weight": w}
                for a, w in zip(self.src.adapters, self.src.weights, strict=True)
            ]
        return out

    def report(self, result: ExportResult | None) -> Report:
        src = self.src
        return Report(
            {"path": str(self.path), "family": "hf-causal", "parameters": src.checkpoint.numel},
            [adapter_info(a, w) for a, w in zip(src.adapters, src.weights, strict=True)],
            export=result,
            machine=machine(),
        )

    def finish(self, report: Report) -> None:
        report.stages = [r.to_json() for r in self.records]
        report.memory = memory_facts(self.src.checkpoint)


def model_report(path: Path, loaded: Loaded, stats: MergeStats | None, result: ExportResult | None) -> Report:
    """A new report of ``loaded`` (merged by ``stats``, exported as ``result``)."""
    return Report(
        base_info(path, loaded.family, loaded.base),
        [adapter_info(a, w) for a, w in zip(loaded.adapters, loaded.adapter_weights, strict=True)],
        merge=stats,
        export=result,
        machine=machine(),
    )


def from_checkpoint(
    model_dir, adapters: list, weights, half: Precision | None, run: Run, kept: bool
) -> FromCheckpoint:
    """The checkpoint's headers and the adapters read and checked (``kept``: the adapter stays
    as branches beside the base; ``half``: the merged weights rounded to it); no weight is read yet."""
    records: list[StageRecord] = []
    with Stage("load and check the inputs (headers, adapters)", records):
        src = load_checkpoint(model_dir, adapters, weights, kept, half, run.allow_pickle)
    return FromCheckpoint(Path(model_dir), src, _mode(adapters, kept), run.show_progress, records)


def _mode(adapters: list, kept: bool) -> ExportMode:
    if not adapters:
        return ExportMode.BASE
    return ExportMode.UNMERGED if kept else ExportMode.MERGED


def load_checkpoint(base, adapter_paths, weights, kept: bool, half, allow_pickle: bool) -> CheckpointSource:
    """The checkpoint of ``base`` with ``adapter_paths`` (loaded and checked), to be read tensor by
    tensor; ``half``: the precision the merged weights are rounded to (None: float32)."""
    adapters = [Adapter.load(a, allow_pickle) for a in adapter_paths]
    check_dora(adapters, weights)
    dora = next((a for a in adapters if a.config.use_dora), None)
    if kept and dora is not None:
        raise UnsupportedAdapterError(
            f"{dora.path} is a DoRA adapter: a streamed unmerged graph keeps LoRA branches beside the base, "
            "and DoRA's magnitude rescales the whole weight; export it merged"
        )
    storage = torch_dtype(half) or torch.float32
    return CheckpointSource(base, adapters, check_weights(adapters, weights), merge=not kept, storage=storage)


def write_streamed(
    src: CheckpointSource,
    out_dir: Path,
    precision: Precision,
    log: Log,
    progress: bool,
    block: int | None = None,
) -> ExportResult:
    """``out_dir/model.onnx`` (+ ``.data``) written from ``src`` tensor by tensor (int8/int4 in
    blocks of ``block``, default ``NBITS_BLOCK``)."""
    t0 = time.perf_counter()
    path = out_dir / "model.onnx"
    total = src.checkpoint.nbytes
    with Progress(total, "export", "B", progress) as bar:
        src.checkpoint.on_read = bar.update
        info = write_fused_decoder(src, path, precision, streamed=True, block=block)
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
