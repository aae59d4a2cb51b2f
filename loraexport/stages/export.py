"""The export stage: one flow (``write_export``), whatever the weights' residency. A ``Source``
(``stages.sources``: the model in memory, or the checkpoint tensor by tensor) writes the graphs and
their description into a temporary folder; the flow adds what made them, what an app needs beside
them (``write_extras``), and for ``merge-and-export`` the verification and its report; the folder
is moved into place only when complete (``artifact.output``), with ``loraexport.json`` written
last (``artifact.provenance``). ``convert-adapter`` adds one adapter file to an adapter-mode export."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from loraexport.artifact.output import OutputPlan, write_output
from loraexport.artifact.output.plan import is_adapter_file, plan_files
from loraexport.artifact.output.write import write_files
from loraexport.artifact.schema import META, read_export_meta
from loraexport.core.enums import ExportMode
from loraexport.core.io import DirDigest, read_json, write_json
from loraexport.errors import ExportError, InvalidInputError, ModelFormatError, UsageError
from loraexport.export import genai
from loraexport.export.adapter import ADAPTER_SUFFIX, GraphLora, write_adapter_file
from loraexport.export.adapter_files import adapter_file_tensors
from loraexport.export.onnx import ExportResult, check_opset
from loraexport.lora.adapter import Adapter
from loraexport.models.base import ModelFamily
from loraexport.models.hf.decoder_config import check_fused_dir
from loraexport.models.registry import detect_family
from loraexport.models.types import FUSED_TYPES, OPTIMIZED_TYPES
from loraexport.report.contents import Report
from loraexport.report.files import write_report
from loraexport.spec import RUN_FIELDS, SPEC_FIELDS, ExportSpec, Run, run_of, spec_of, split_fields
from loraexport.stages.float_graphs import FloatGraphs
from loraexport.stages.graphs import (  # noqa: F401 (re-exported: the export stage's names)
    Subject,
    describe,
    describe_quantization,
    export_into,
    export_model,
    export_subject,
    lora_factors,
    quantize_graphs,
    torch_exporter_of,
)
from loraexport.stages.inputs import as_list, check_dora_mode, load_inputs, plan
from loraexport.stages.residency import check_streamable, streams
from loraexport.stages.sources import FromCheckpoint, FromModel, from_checkpoint

Source = FromModel | FromCheckpoint
Check = Callable[
    [Report, Path, dict, FloatGraphs | None], None
]  # (report, folder, description, float graphs)


def write_export(
    source: Source, out_plan: OutputPlan, spec: ExportSpec, run: Run, key: str, check: Check | None = None
) -> tuple[ExportResult, Report | None]:
    """The export flow: ``source``'s graphs written as ``spec`` says into ``out_plan``'s
    temporary folder, with ``loraexport.json``'s description (the input under ``key``: "model" for
    ``export``, "base" for ``merge-and-export``) and the extras. With ``check`` (``merge-and-export``):
    a report, filled by ``check`` when ``run.verify_output``, written beside the export. The
    folder is moved into place when complete, also when a check failed (the report says why)."""
    meta: dict = {}
    report = None
    # the input folder's sha256 (provenance) is read while the graphs are written: see DirDigest
    with write_output(out_plan, meta=meta) as tmp, DirDigest(source.path) as digest:
        # the float graphs before quantizing, for the proof (quantized again, not exported again)
        verifies = check is not None and run.verify_output
        keeps = verifies and spec.quant is not None and isinstance(source, FromModel)
        made = FloatGraphs(tmp, source.avoid) if keeps else None
        try:
            result = source.write(tmp, meta, spec, run.log, made.keep if made else None)
            meta["inputs"] = source.inputs(key, digest.result())
            write_extras(source.family, source.path, tmp, meta)
            if check is not None:
                report = source.report(result)
                if verifies:  # loraexport.json is written when the output is complete: ``meta`` now
                    check(report, tmp, meta, made)
                source.finish(report)
        finally:
            if made:
                made.close()
        if report is not None:
            write_report(report, tmp)
    return result, report


def export(
    model_dir: str | Path,
    out: str | Path,
    spec: ExportSpec | None = None,
    *,
    adapter: str | Path | list[str | Path] | None = None,
    weights: list[float] | None = None,
    run: Run | None = None,
    **fields,
) -> ExportResult:
    """Export a model directory (optionally with adapters, ``merged`` or ``unmerged``) to ONNX.

    ``spec`` (or its options as keywords, ``spec.ExportSpec.from_options``): ``dtype``
    float16/bfloat16: the merged (or base) weights are rounded to it once and stored in it; the
    graph computes in float32. ``quantize`` int8/int4: the graph's MatMuls are quantized
    (``export.quantize``); with ``keep_adapter`` only the base's, the LoRA branches staying in
    float32 beside them (an unmerged graph). ``optimize``: fused, last-position graphs for Hugging
    Face decoders (``export.optimize``). ``stream``: True writes the fused graph from the checkpoint
    tensor by tensor, in bounded memory (``stages.sources``); None (the default) does so for the
    decoders the fused writer supports whenever it does what is asked; False never. ``run`` (or
    force, allow_pickle, log, show_progress).
    """
    spec_fields, run_fields = split_fields(fields, SPEC_FIELDS, RUN_FIELDS)
    run = run_of(run, run_fields)
    spec = spec_of(spec, spec_fields)
    adapters = as_list(adapter) if adapter else []
    spec.check(adapters, weights)
    check_dora_mode(adapters, spec.mode, spec.keep_adapter, spec.optimize)
    inputs = {"--model": model_dir, "--adapter": adapters}
    source: Source
    if streams(model_dir, spec, None, adapters):
        run.log(f"{model_dir}: streamed (the model is not loaded; memory stays bounded) …")
        spec.check_streamed()
        check_streamable(model_dir, spec.mode, spec.half, verify=False, command="export")
        out_plan = plan(out, run.force, run.log, inputs)
        source = from_checkpoint(
            model_dir, adapters, weights, spec.half, run, spec.mode is ExportMode.UNMERGED
        )
    else:
        out_plan = plan(out, run.force, run.log, inputs)
        check_opset(
            spec.opset, spec.exporter or detect_family(model_dir).exporter
        )  # before the weights are read
        check_optimize(model_dir, spec.optimize)
        loaded = load_inputs(model_dir, adapters, run.allow_pickle, weights)
        subject = export_subject(loaded, spec.mode, spec.stored, spec.max_rank)
        source = FromModel(Path(model_dir), loaded, subject)
    return write_export(source, out_plan, spec, run, "model")[0]


def check_optimize(model_dir: str | Path, optimize: bool) -> None:
    """Refuse --optimize (``InvalidInputError``, before any work) for a model it does not apply to."""
    if not optimize:
        return
    family = detect_family(model_dir)
    config = read_json(Path(model_dir) / "config.json", ModelFormatError)
    if not family.optimizes(config):
        raise InvalidInputError(
            f"--optimize applies to Hugging Face decoders ({', '.join(optimize_types())}); "
            f"{model_dir} is a {family.name} model of type {config.get('model_type')!r}"
        )
    if config.get("model_type") in FUSED_TYPES:
        try:
            check_fused_dir(model_dir)
        except ExportError as e:
            raise InvalidInputError(f"--optimize: {model_dir}/config.json: {e}") from e


def optimize_types() -> tuple[str, ...]:
    return OPTIMIZED_TYPES


def write_extras(family: ModelFamily, src: Path, dst: Path, description: dict) -> None:
    """What an app needs beside the graph: the base's config and tokenizer files (the tokenizer
    class under the name transformers 4.x, Optimum and onnxruntime-genai read), and for a
    decoder onnxruntime-genai runs, ``genai_config.json`` (``export.genai``)."""
    for name in family.extra_files:
        if not (src / name).is_file():
            continue
        if name == "tokenizer_config.json":  # checked when the base was loaded
            config = read_json(src / name, ModelFormatError)
            write_json(dst / name, genai.portable_tokenizer_config(config))
        else:
            shutil.copy2(src / name, dst / name)
    if genai.supported(description["model"]) and "model" in description["graphs"]:
        config = genai.genai_config(description["model"], description["graphs"]["model"])
        write_json(dst / genai.GENAI_CONFIG, config)


def _export_files(onnx_dir: Path, meta: dict) -> list[Path]:
    """The files of an export that convert-adapter must not write over: its description, its
    graphs and their data, and the adapter files it lists (their sha256 is in its description).
    A new adapter file may go beside them."""
    listed = {e.get("file") for e in meta.get("adapter_files") or [] if isinstance(e, dict)}
    return [
        p
        for p in onnx_dir.iterdir()
        if p.name == META or p.name.endswith((".onnx", ".onnx.data")) or p.name in listed
    ]


def convert_adapter(
    adapter_dir: str | Path,
    onnx_dir: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """A PEFT adapter as an onnxruntime adapter file for an adapter-mode export; checked against
    the graph (names, shapes, rank) before anything is written. Returns what was written."""
    if not str(out).endswith(ADAPTER_SUFFIX):
        raise UsageError(f"--out {out} must end in {ADAPTER_SUFFIX} (the name loraexport.runtime looks for)")
    onnx_dir = Path(onnx_dir)
    meta = read_export_meta(onnx_dir, InvalidInputError)
    out_plan = plan_files(
        [out],
        force=force,
        inputs={"ADAPTER_DIR": adapter_dir, "--onnx": _export_files(onnx_dir, meta)},
        label="--out",
        previous=is_adapter_file,
    )
    graph = GraphLora.from_meta(meta, str(onnx_dir))
    adapter = Adapter.load(adapter_dir, allow_pickle)
    tensors = adapter_file_tensors(adapter, graph)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter"
        write_adapter_file(tensors, path)
        data = path.read_bytes()
    write_files(out_plan, {out_plan.targets[0]: data})
    target, modules = out_plan.targets[0], len(tensors) // 2
    return {"file": str(target), "modules": modules, "bytes": len(data)}
