"""The verify stage: one flow (``verify_into``) for every export and residency — a reference
(``stages.references``: the model in memory, each adapter's own model, or the unmerged model
computed layer by layer) × a runner (one onnxruntime session, or a few layers at a time:
``verify.chunked``) × the gates (``verify.gates``). Proof first (a quantized export; a float32 one
``proves`` says), then
parity, what rounding costs, and latency, into a ``Report``; ``verify`` writes ``report.json`` and
``report.md`` atomically."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from loraexport.artifact.manifest import check_manifest
from loraexport.artifact.output import OutputPlan, plan_files, write_files
from loraexport.artifact.schema import BUILDER, graph_files, read_export_meta
from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode, Precision, half_precision, quantization
from loraexport.core.io import require_dir
from loraexport.errors import InvalidInputError, ModelFormatError, UsageError, VerificationFailedError
from loraexport.report.contents import Report
from loraexport.report.files import report_texts
from loraexport.runtime.model import RuntimeInputError, check_external_data
from loraexport.spec import RUN_FIELDS, Run, run_of, split_fields
from loraexport.stages.extras import prove_extras
from loraexport.stages.inputs import Loaded, as_list, check_eval_data, load_inputs, machine
from loraexport.stages.merge import merged_model
from loraexport.stages.references.adapters import Adapters
from loraexport.stages.references.in_memory import InMemory
from loraexport.stages.references.layered import Layered
from loraexport.stages.residency import check_session_fits, check_streamable, verifies_in_memory, wants_stream
from loraexport.stages.sources import FromCheckpoint, from_checkpoint, model_report
from loraexport.stages.verification import Verification
from loraexport.verify import gates
from loraexport.verify.chunked import is_fused
from loraexport.verify.options import OPTION_FIELDS, VerifyOptions, options_of

Reference = InMemory | Adapters | Layered


def verify_into(v: Verification, reference: Reference) -> None:
    """The verification flow, the same for every export: ``reference`` set up (providers,
    threads, inputs); a quantized export proven weight by weight (a failed proof ends it: parity
    and quality would measure a file that is not the reference's); parity; what rounding costs;
    latency. Every finding goes into ``v.report``, judged by ``verify.gates``."""
    try:  # setup may leave scratch behind when it fails: closed either way
        reference.setup(v)
        proven = None
        quantized = quantization(v.meta.get("weights_dtype"))
        if quantized or proves(v, reference):
            proven = reference.prove(v)
            if v.base is not None:  # and the files beside the graph are the base's
                proven.proof.files.append(prove_extras(v.base, v.onnx_path, v.meta))
            v.report.proof = proven.proof
            if not proven.proof.passed:
                v.log("proof: the export is not the reference's; parity and quality not measured")
                return
            if not quantized:  # a float32 file proven equal: parity runs it against the model itself
                proven = None
        reference.parity(v, proven)
        reference.quality(v, proven)
        reference.latency(v)
    finally:
        reference.close()


def proves(v: Verification, reference: Reference) -> bool:
    """Whether a float export (float32, float16, bfloat16) is proven too, tensor by tensor, before
    parity (``stages.prove``): parity reads the positions, ids and token types its cases feed, a
    proof every weight and attribute. A graph loraexport writes (written again: seconds), and any
    other export ``verify`` reads (exported again: as long as the export); not one
    ``merge-and-export`` has just exported from this very reference (``v.wrote``), nor an
    adapter-mode graph verified with adapters other than those it was exported with."""
    if Precision.parse(v.meta.get("weights_dtype", Precision.FLOAT32.value)).is_quantized:
        return False
    if isinstance(reference, Layered):  # the checkpoint read tensor by tensor: the fused graph only
        return is_fused(v.meta)
    if isinstance(reference, Adapters):  # LoRA inputs for the adapters it was exported with (it
        # serves any that fits): proven when verify is given those, and parity judges any other
        listed = [e.get("source_sha256") for e in v.meta.get("adapter_files") or [] if isinstance(e, dict)]
        given = [a.sha256() for a in reference.loaded.adapters if a.path is not None]
        return not v.wrote and bool(listed) and sorted(map(str, listed)) == sorted(given)
    return v.meta.get("exporter") == BUILDER or not v.wrote


def in_memory(loaded: Loaded, merged: nn.Module, meta: dict) -> Reference:
    """The reference in memory for the export ``meta`` describes: each adapter's own model for an
    adapter-mode export, else ``loaded`` unmerged (and ``merged``, rounded as the file stores it)."""
    half = half_precision(meta.get("weights_dtype"))
    if meta.get("mode") == ExportMode.ADAPTER.value:
        return Adapters(loaded, half)
    return InMemory(loaded, merged, half)


def layered(source: FromCheckpoint) -> Reference:
    return Layered(source.src, source.mode)


def verify(
    base: str | Path,
    adapter: str | Path | list[str | Path],
    onnx_dir: str | Path,
    options: VerifyOptions | None = None,
    *,
    weights: list[float] | None = None,
    report_path: str | Path | None = None,
    run: Run | None = None,
    **fields,
) -> Report:
    """Parity of ``onnx_dir`` against base + adapter(s) unmerged, and latency.
    ``stream`` (None: auto, for a streamed export or a model that would not fit in memory): the
    reference computed layer by layer from the checkpoint (``stages.references.layered``).
    An adapter-mode export (``mode`` "adapter", else as its ``loraexport.json`` says): each
    adapter against its own unmerged model (``stages.references.adapters``).

    ``adapter`` is one path or a list; ``weights`` one weight per adapter (default 1.0 each).
    ``report_path``: write report.json there and report.md beside it (checked before any work,
    like every output; replaced only with ``force``, and only if verify wrote it). ``options``
    (or its fields as keywords): how to check; ``run`` (or force, allow_pickle, log,
    show_progress); ``mode``, ``stream`` as keywords. Returns the report; raises
    ``VerificationFailedError`` (with ``.report``, after writing it) when parity fails.
    """
    option_fields, run_fields, asked = split_fields(fields, OPTION_FIELDS, RUN_FIELDS, ("mode", "stream"))
    opts = options_of(options, option_fields)  # checked before any work
    run = run_of(run, run_fields)
    mode, stream = asked.get("mode"), asked.get("stream")
    adapters = as_list(adapter)
    inputs = {"--base": base, "--adapter": adapters, "--onnx": onnx_dir, "--eval-data": opts.eval_data}
    out_plan = plan_report(report_path, run.force, inputs) if report_path is not None else None
    check_eval_data(opts.eval_data)
    onnx_path = require_dir(onnx_dir, "ONNX directory")
    meta = read_export_meta(onnx_path, ModelFormatError)  # once, bounded and type-checked
    check_graph_files(onnx_path, meta)  # sizes and external data's bounds, before a byte is hashed
    files = check_manifest(onnx_path).to_json()  # before anything runs: every file as written
    if gates.manifest_failures(files):
        report = Report({"path": str(base), "family": "not loaded", "parameters": 0}, [], machine=machine())
        report.manifest = files
        _write_and_raise(report, out_plan)
    check_mode(meta, mode, weights, onnx_path)
    if _layered(base, meta, stream):
        source = _layered_source(base, adapters, onnx_path, meta, weights, opts, run)
        report = source.report(None)
        report.notes.append("verified against the unmerged model computed layer by layer from the checkpoint")
        records, progress = source.records, run.show_progress
        verify_into(
            Verification(
                report, onnx_path, meta, opts, run.log, records=records, progress=progress, base=Path(base)
            ),
            layered(source),
        )
        source.finish(report)
    else:
        loaded = load_inputs(base, adapters, run.allow_pickle, weights)
        half = half_precision(meta.get("weights_dtype"))
        merged, stats = merged_model(
            loaded.base, loaded.adapters, loaded.weights, storage_dtype=torch_dtype(half)
        )
        report = model_report(Path(base), loaded, stats, None)
        v = Verification(report, onnx_path, meta, opts, run.log, base=Path(base))
        verify_into(v, in_memory(loaded, merged, meta))
    report.manifest = files
    return _write_and_raise(report, out_plan)


def _layered(base, meta: dict, stream: bool | None) -> bool:
    """Whether the reference is computed layer by layer: ``--stream``; by default for a model that
    would not fit in memory, and for an export written from the checkpoint unless the model is
    small enough to verify in memory (``residency.verifies_in_memory``, as merge-and-export
    decides; a half-stored one stays layered)."""
    if stream is not None:
        return stream and wants_stream(base, True)
    if wants_stream(base, None):
        return True
    small = verifies_in_memory(base) and not Precision.parse(meta.get("weights_dtype", "float32")).is_half
    return meta.get("streamed") is True and not small


def _layered_source(
    base, adapters: list, onnx_dir: Path, meta: dict, weights, opts, run: Run
) -> FromCheckpoint:
    """The checkpoint a causal export (streamed or not) of a Llama/Mistral/Qwen2 model is verified
    against, layer by layer, with ``adapters`` kept as branches (the reference is unmerged)."""
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
    source = from_checkpoint(base, adapters, weights, half, run, kind is ExportMode.UNMERGED)
    if not is_fused(meta):  # a fused graph runs a few layers at a time (verify.chunked)
        check_session_fits(source.src.checkpoint, precision)
    return source


def check_graph_files(onnx_path: Path, meta: dict) -> None:
    """Each graph file an ONNX file of bounded size whose external data stays inside the folder
    and within its data file (``runtime.files.check_external_data``): exit 3, unread, otherwise."""
    for name in graph_files(meta):
        try:
            check_external_data(onnx_path / name)
        except RuntimeInputError as e:
            raise InvalidInputError(str(e)) from e


def _write_and_raise(report: Report, out_plan: OutputPlan | None) -> Report:
    """``--report``'s files written, then ``VerificationFailedError`` when a check failed."""
    if out_plan is not None:
        write_files(out_plan, dict(zip(out_plan.targets, report_texts(report), strict=True)))
    raise_if_failed(report, out_plan.targets[1] if out_plan is not None else None)
    return report


def check_mode(meta: dict, mode: str | None, weights: list[float] | None, where: Path) -> None:
    """``--mode`` given must be the export's; adapter mode checks each adapter alone (no weights)."""
    exported = meta.get("mode")
    if (
        mode is not None
        and ExportMode.parse(mode).value != exported
        and not (mode == ExportMode.MERGED.value and exported == ExportMode.BASE.value)
    ):
        raise InvalidInputError(f"--mode {mode}: {where} was exported with mode {exported}")
    if exported == ExportMode.ADAPTER.value and weights:
        raise InvalidInputError(
            "--weight does not apply to an adapter-mode export: each adapter is checked alone"
        )


def raise_if_failed(report: Report, written: Path | None) -> None:
    if report.passed is False:
        where = f"; report written to {written}" if written is not None else ""
        raise VerificationFailedError(f"{report.verdict}: {'; '.join(report.failures[:2])}{where}", report)


def plan_report(path: str | Path, force: bool, inputs: dict) -> OutputPlan:
    """``--report FILE``: FILE (report.json) and FILE with the suffix .md beside it."""
    p = Path(path)
    if p.suffix.lower() == ".md":  # report.MD too: on a case-insensitive disk, the same file as its .md
        raise UsageError(
            f"--report {p} ends in .md: it names the JSON report, and the Markdown one is written "
            "beside it with the suffix .md; give e.g. --report report.json"
        )
    return plan_files([p, p.with_suffix(".md")], force=force, inputs=inputs, label="--report")
