"""The verify stage: an export against base + adapter(s) unmerged, on each provider — parity
(every output, float32 and the float64 noise floor, greedy generation), what half precision
costs, and latency — into a ``Report``; ``report.json`` and ``report.md`` written atomically."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnxruntime as ort
from torch import nn

from loraexport.artifact.manifest import check_manifest
from loraexport.artifact.output import OutputPlan, plan_files, write_files
from loraexport.artifact.schema import read_export_meta
from loraexport.core import threads as torch_threads
from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode, Precision, half_precision, quantization
from loraexport.core.io import require_dir
from loraexport.errors import InvalidInputError, ModelFormatError, UsageError, VerificationFailedError
from loraexport.export.onnx import ExportResult
from loraexport.lora.merge import MergeStats
from loraexport.report.contents import Report
from loraexport.report.files import report_texts
from loraexport.runtime.model import PROVIDERS, RuntimeInputError, check_external_data
from loraexport.spec import RUN_FIELDS, ExportSpec, Run, run_of, split_fields
from loraexport.stages.graphs import describe, export_model, torch_exporter_of
from loraexport.stages.inputs import (
    Loaded,
    adapter_info,
    as_list,
    base_info,
    check_eval_data,
    load_inputs,
    machine,
)
from loraexport.stages.merge import merged_model, unmerged_model
from loraexport.stages.prove import graph_files
from loraexport.stages.residency import wants_stream
from loraexport.stages.verification import Verification
from loraexport.stages.verify_adapters import verify_adapter_mode
from loraexport.stages.verify_quantized import verify_quantized
from loraexport.training.data import read_pairs
from loraexport.verify import gates
from loraexport.verify.half import half_precision_costs
from loraexport.verify.latency import measure_latency, open_model
from loraexport.verify.options import OPTION_FIELDS, VerifyOptions, options_of
from loraexport.verify.parity_on import parity_on
from loraexport.verify.stored import STORED_EPS, stored_weights_error


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
    """Parity of ``onnx_dir`` (merged export) against base + adapter(s) unmerged, and latency.
    ``stream`` (None: auto, for a streamed export or a model that would not fit in memory): the
    reference computed layer by layer from the checkpoint (``stages.streamed.verify_export``).
    An adapter-mode export (``mode`` "adapter", else as its ``loraexport.json`` says): each
    adapter against its own unmerged model (``stages.verify_adapters``).

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
    mode, stream, log = asked.get("mode"), asked.get("stream"), run.log
    inputs = {
        "--base": base,
        "--adapter": as_list(adapter),
        "--onnx": onnx_dir,
        "--eval-data": opts.eval_data,
    }
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
    half = half_precision(meta.get("weights_dtype"))
    if stream is not False and (meta.get("streamed") is True or wants_stream(base, stream)):
        from loraexport.stages.streamed import verify_export

        report = verify_export(base, as_list(adapter), onnx_path, meta, weights, opts, run)
        report.manifest = files
        return _write_and_raise(report, out_plan)
    loaded = load_inputs(base, as_list(adapter), run.allow_pickle, weights)
    merged, stats = merged_model(
        loaded.base, loaded.adapters, loaded.weights, storage_dtype=torch_dtype(half)
    )
    report = new_report(base, loaded, stats, None)
    report.manifest = files
    verify_into(Verification(report, onnx_path, meta, opts, log), loaded, merged, half)
    return _write_and_raise(report, out_plan)


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
    if p.suffix == ".md":
        raise UsageError(
            f"--report {p} ends in .md: it names the JSON report, and the Markdown one is written "
            "beside it with the suffix .md; give e.g. --report report.json"
        )
    return plan_files([p, p.with_suffix(".md")], force=force, inputs=inputs, label="--report")


def new_report(
    base: str | Path, loaded: Loaded, stats: MergeStats | None, export: ExportResult | None
) -> Report:
    return Report(
        base_info(base, loaded.family, loaded.base),
        [adapter_info(a, w) for a, w in zip(loaded.adapters, loaded.adapter_weights, strict=True)],
        merge=stats,
        export=export,
        machine=machine(),
    )


def verify_into(v: Verification, loaded: Loaded, merged: nn.Module, half: Precision | None = None) -> None:
    """Add parity (per provider), half-precision costs and latency to ``v.report``.

    With half-stored weights (``half``), parity is judged against ``merged`` (the merged
    weights rounded to that precision, which the file must hold exactly), and what the
    rounding costs against the unmerged model is added to the half-precision section.
    ``v.meta`` is the export's description (``loraexport.json``, read once or not written yet);
    the comparison graphs for latency are exported with its exporter. ``v.made``: the float
    graphs this run exported (``merge-and-export``), for the proof of a quantized export.
    """
    report, onnx_path, meta, opts, log = v.report, v.onnx_path, v.meta, v.opts, v.log
    v.providers = providers = resolve_providers(opts.providers)
    v.threads = threads = torch_threads.use(
        sum(p.numel() for p in loaded.base.parameters()), opts.threads, log
    )
    v.pairs = pairs = read_pairs(opts.eval_data) if opts.eval_data else None
    sources = v.sources
    if meta.get("mode") == ExportMode.ADAPTER.value:  # each adapter against its own model
        verify_adapter_mode(v, loaded, torch_exporter_of(meta), half)
        return
    unmerged = unmerged_model(loaded.base, loaded.adapters, loaded.weights)
    providers_for_parity = providers
    if quantization(meta.get("weights_dtype")):  # proven weight by weight, then judged by arithmetic
        verify_quantized(v, loaded)
        providers_for_parity = []
    reference = merged if half else unmerged
    what = f"the {half.value}-rounded merged model" if half else "the unmerged model"
    stored = _stored(meta, half, unmerged, merged)
    for provider in providers_for_parity:
        log(f"parity [{provider}]: {opts.samples} cases against {what} (float32 and float64) …")
        # Opened inside and closed before the torch runs: never the session and the float64
        # model at once (memory stays near twice the weights).
        opener = lambda p=provider: open_model(onnx_path, p, threads, meta)  # noqa: E731
        result = parity_on(loaded.family, reference, opener, opts, pairs, loaded.tokenizer, stored=stored)
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
    _half_costs(report, loaded, merged, unmerged, opts, log, half, sources)
    if opts.latency and (report.proof is None or report.proof.passed):
        _latency(report, loaded, merged, unmerged, (onnx_path, meta), opts, log, providers, threads)


def _stored(meta: dict, half, unmerged: nn.Module, merged: nn.Module) -> nn.Module | None:
    """The merged float32 model whose weights a merged float32 export stores, when they are the
    correctly rounded merge of the unmerged reference (``verify.stored``); else None."""
    if half or meta.get("mode") != ExportMode.MERGED.value or merged is None:
        return None
    return merged if stored_weights_error(unmerged, merged) <= STORED_EPS else None


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
