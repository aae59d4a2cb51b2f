"""The stages over directories — merge, export, verify — and ``merge_and_export`` chaining them.

Every command writes its output into a temporary folder beside ``out`` and renames it into
place only when complete (``output.write_output``), after checking before any work that it
is no input (``output.plan_output``); verification failure still writes the report and then
raises ``VerificationFailedError`` (exit 4).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from loraexport.data import read_pairs
from loraexport.errors import InvalidInputError, ModelFormatError, UsageError, VerificationFailedError
from loraexport.export.half import HALF_DTYPES, store_weights_half
from loraexport.export.onnx import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_BYTES,
    ExportResult,
    check_opset,
    export_graphs,
)
from loraexport.io import read_json, require_dir, sha256_dir, write_json
from loraexport.lora.adapter import Adapter
from loraexport.lora.merge import MergeStats, merge_state_dict
from loraexport.lora.stream import checkpoint_shards, stream_merge
from loraexport.lora.views import merged_view, unmerged_view
from loraexport.manifest import Hasher
from loraexport.models.base import ModelFamily
from loraexport.models.registry import detect_family, load_model_dir
from loraexport.output import OutputPlan, plan_files, plan_output, write_files, write_output
from loraexport.progress import Progress
from loraexport.report import Report, versions
from loraexport.runtime import PROVIDERS, OnnxModel, RuntimeInputError, read_export_meta
from loraexport.verify.half import MIN_ADAPTER_RETAINED, half_precision_costs
from loraexport.verify.latency import LatencyCase, LatencyResult, time_interleaved
from loraexport.verify.options import VerifyOptions
from loraexport.verify.parity import check_parity

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class Loaded:
    family: ModelFamily
    base: nn.Module
    adapters: list[Adapter]
    weights: list[float] | None = None  # per adapter; None: 1.0 each
    tokenizer: object | None = None  # the base's (``ModelFamily.tokenizer``); None: it has none


def _as_list(paths: str | Path | list | tuple) -> list:
    return list(paths) if isinstance(paths, (list, tuple)) else [paths]


def check_weights(adapters: list, weights: list[float] | None) -> list[float] | None:
    """``weights`` is None or one finite float per adapter."""
    if weights is None or len(weights) == 0:
        return None
    if len(weights) != len(adapters):
        raise UsageError(
            f"{len(adapters)} --adapter but {len(weights)} --weight: give one weight per adapter"
        )
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise InvalidInputError(f"adapter weight {bad[0]} is not a finite number")
    return [float(w) for w in weights]


def load_inputs(
    base: str | Path,
    adapters: list[str | Path],
    allow_pickle: bool = False,
    weights: list[float] | None = None,
) -> Loaded:
    weights = check_weights(adapters, weights)
    model_dir = load_model_dir(base)
    loaded = [Adapter.load(a, allow_pickle) for a in adapters]
    for a in loaded:
        a.check_fits(model_dir.model)
    return Loaded(model_dir.family, model_dir.model, loaded, weights, model_dir.tokenizer)


def unmerged_model(
    base: nn.Module, adapters: Adapter | list[Adapter], weights: list[float] | None = None
) -> nn.Module:
    """``base`` with the adapters' LoRA branches active (the parity reference); shares the
    base's untouched tensors (``lora.views``)."""
    return unmerged_view(base, _as_list(adapters), weights)


def merged_model(
    base: nn.Module,
    adapters: list[Adapter],
    weights: list[float] | None = None,
    storage_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, MergeStats]:
    """``base`` with ``W0 + Σ w·s·B·A`` in place of the adapted weights (no LoRA modules).

    Shares every tensor the merge leaves alone with ``base`` (``lora.views``): one extra copy
    of the adapted weights, not of the model.
    """
    state = base.state_dict()
    merged_state, stats = merge_state_dict(state, adapters, weights, storage_dtype=storage_dtype)
    return merged_view(base, state, merged_state), stats


def _adapter_info(a: Adapter, weight: float = 1.0) -> dict:
    return {
        "weight": weight,
        "path": str(a.path),
        "sha256": a.sha256(),
        "r": a.config.r,
        "alpha": float(a.config.lora_alpha),
        "targets": a.config.target_modules,
        "modules": len(a.weights),
        "use_rslora": a.config.use_rslora,
        "parameters": a.num_parameters,
    }


def _adapter_inputs(loaded: Loaded) -> list[dict]:
    """Provenance of each adapter: path, sha256 and the weight it was merged with."""
    weights = loaded.weights or [1.0] * len(loaded.adapters)
    return [
        {"path": str(a.path), "sha256": a.sha256(), "weight": w}
        for a, w in zip(loaded.adapters, weights, strict=True)
    ]


def _base_info(path: str | Path, family: ModelFamily, model: nn.Module) -> dict:
    return {
        "path": str(path),
        "family": family.name,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "platform": platform.platform()}


def _check_eval_data(path: str | Path | None) -> None:
    """Read the generation prompts once before any work: a bad file fails in a second, not
    after the merge and export."""
    if path is not None:
        read_pairs(path)


def _plan(out: str | Path, force: bool, log: Log, inputs: dict) -> OutputPlan:
    """Check ``out`` against every input before any work (``output.plan_output``)."""
    plan = plan_output(out, force=force, inputs=inputs)
    for stale in plan.removed_stale:
        log(f"removed {stale.name}, left by a run that was killed")
    return plan


# ---- merge -----------------------------------------------------------------------------------
def merge(
    base: str | Path,
    adapters: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
    log: Log = _quiet,
) -> MergeStats:
    """Merge adapter(s) into the safetensors checkpoint in ``base``; write ``out`` in its layout.

    Streams tensor by tensor (``lora.stream``): no model is built, memory stays bounded by the
    largest tensor, untargeted tensors are copied without being decoded. ``merge.json`` records
    per module max|ΔW| and the error of the final cast.
    """
    weights = check_weights(adapters, weights)
    plan = _plan(out, force, log, {"--base": base, "--adapter": adapters})
    base_dir = require_dir(base, "base model directory")
    loaded = [Adapter.load(a, allow_pickle) for a in adapters]
    shards, _ = checkpoint_shards(base_dir)
    total = sum((base_dir / s).stat().st_size for s in shards)
    hasher = Hasher()  # shards are hashed for the manifest while the next one is merged
    with (
        write_output(plan, hasher) as tmp,
        Progress(total, "merge", "B", show_progress) as bar,
    ):
        stats = stream_merge(
            base_dir,
            loaded,
            tmp,
            weights,
            storage_dtype=DTYPES[dtype] if dtype else None,
            on_bytes=bar.update,
            on_file=hasher.submit,
        )
        report = Report(
            {"path": str(base), "family": "safetensors checkpoint", "parameters": 0},
            [_adapter_info(a, w) for a, w in zip(loaded, weights or [1.0] * len(loaded), strict=True)],
            merge=stats,
        )
        write_json(
            tmp / "merge.json", {k: report.to_json()[k] for k in ("versions", "base", "adapters", "merge")}
        )
    return stats


def _half_dtype(dtype: str | None) -> torch.dtype | None:
    """The torch dtype for a float16/bfloat16 weights dtype; None for float32 or None."""
    if dtype in (None, "float32"):
        return None
    if dtype not in HALF_DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; choose from float32, {', '.join(HALF_DTYPES)}")
    return HALF_DTYPES[dtype]


def _copy_extra(family: ModelFamily, src: Path, dst: Path) -> None:
    for name in family.extra_files:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# ---- export ----------------------------------------------------------------------------------
def export_model(
    family: ModelFamily,
    model: nn.Module,
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
    exporter: str | None = None,
    weights_dtype: str | None = None,
) -> ExportResult:
    """Export ``model``'s graphs into ``out_dir`` (which exists) and write ``loraexport.json``.

    ``weights_dtype`` (float16/bfloat16): store the weights in it (``export.half``); ``model``
    must already hold weights rounded to it, so nothing is lost in the file.
    """
    result = export_graphs(family.graph_specs(model), out_dir, opset, exporter or family.exporter)
    if weights_dtype and weights_dtype != "float32":
        for g in result.inputs:
            store_weights_half(out_dir / f"{g}.onnx", weights_dtype, EXTERNAL_DATA_BYTES)
        names = [f for g in result.inputs for f in (f"{g}.onnx", f"{g}.onnx.data")]
        result.files = [f for f in names if (out_dir / f).is_file()]
        result.bytes = sum((out_dir / f).stat().st_size for f in result.files)
    meta = {
        "model": family.runtime_meta(model) | {"family": family.name},
        "opset": result.opset,  # as written (read back from the file)
        "exporter": result.exporter,
        "weights_dtype": weights_dtype or "float32",
        "graphs": {g: {"inputs": result.inputs[g], "outputs": result.outputs[g]} for g in result.inputs},
    }
    write_json(out_dir / "loraexport.json", meta)
    return result


def _write_provenance(out_dir: Path, inputs: dict, extra: dict | None = None) -> None:
    """Complete ``loraexport.json`` with the inputs (and their sha256) and versions."""
    meta = read_json(out_dir / "loraexport.json", ModelFormatError)
    meta["inputs"] = inputs
    meta["versions"] = versions()
    meta.update(extra or {})
    write_json(out_dir / "loraexport.json", meta)  # "files" is added when the output is complete


def export(
    model_dir: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | list[str | Path] | None = None,
    weights: list[float] | None = None,
    mode: str = "merged",
    opset: int = DEFAULT_OPSET,
    exporter: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    dtype: str | None = None,
    log: Log = _quiet,
) -> ExportResult:
    """Export a model directory (optionally with adapters, ``merged`` or ``unmerged``) to ONNX.

    ``dtype`` float16/bfloat16: the merged (or base) weights are rounded to it once and stored
    in it; the graph computes in float32.
    """
    if mode not in ("merged", "unmerged"):
        raise InvalidInputError(f"--mode must be merged or unmerged, got {mode!r}")
    half = _half_dtype(dtype)
    if half and mode == "unmerged" and adapter:
        raise InvalidInputError(
            "--dtype float16/bfloat16 stores merged weights; it does not apply to --mode unmerged"
        )
    adapters = _as_list(adapter) if adapter else []
    plan = _plan(out, force, log, {"--model": model_dir, "--adapter": adapters})
    check_opset(opset, exporter or detect_family(model_dir).exporter)  # before the weights are read
    loaded = load_inputs(model_dir, adapters, allow_pickle, weights)
    model = loaded.base
    if loaded.adapters or half:
        model = (
            merged_model(model, loaded.adapters, loaded.weights, storage_dtype=half)[0]
            if mode == "merged" or not loaded.adapters
            else unmerged_model(model, loaded.adapters, loaded.weights)
        )
    inputs = {"model": {"path": str(model_dir), "sha256": sha256_dir(Path(model_dir))}}
    if loaded.adapters:
        inputs["adapters"] = _adapter_inputs(loaded)
    with write_output(plan) as tmp:
        result = export_model(loaded.family, model, tmp, opset, exporter, dtype if half else None)
        _copy_extra(loaded.family, Path(model_dir), tmp)
        _write_provenance(tmp, inputs, {"mode": mode if loaded.adapters else "base"})
    return result


# ---- verify ----------------------------------------------------------------------------------
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


def _open(directory: Path, provider: str, threads: int | None) -> OnnxModel:
    try:
        return OnnxModel(directory, provider, threads)
    except RuntimeInputError as e:
        raise InvalidInputError(str(e)) from e


def measure_latency(
    family: ModelFamily,
    provider: str,
    threads: int,
    models: dict[str, nn.Module],
    onnx_dirs: dict[str, Path],
    log: Log = _quiet,
    budget_s: float = 4.0,
    points: tuple[tuple[int, int], ...] | None = None,
) -> LatencyResult:
    """Time torch (unmerged, merged) and ONNX (merged, base, unmerged), interleaved, per (batch, seq)."""
    torch.set_num_threads(threads)
    device = "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"
    # Measured here: of several identical sessions opened in a row, the first ran 5-8% slower
    # than the others, whichever graph it held. A sacrificial session absorbs that, so the
    # merged/base ratio compares like with like.
    sacrificial = _open(next(iter(onnx_dirs.values())), provider, threads)
    sessions = {name: _open(d, provider, threads) for name, d in onnx_dirs.items()}
    result = LatencyResult(provider, threads)
    torch_models = (
        {n: m.to(device) for n, m in models.items()} if provider == "cpu" or device == "cuda" else {}
    )
    for batch, seq in points or family.latency_points:
        inputs = family.latency_inputs(models["torch_unmerged"], batch, seq)
        np_in = {k: v.numpy() for k, v in inputs.items()}
        dev_in = {k: v.to(device) for k, v in inputs.items()}
        variants: dict[str, Callable[[], object]] = {}
        for name, m in torch_models.items():
            variants[name] = _torch_call(m, dev_in, device)
        for name, s in sessions.items():
            variants[name] = lambda s=s, x=np_in: s.forward(**x)
        log(f"latency [{provider}] batch {batch} × seq {seq}: {len(variants)} variants, interleaved …")
        result.cases.append(LatencyCase(batch, seq, time_interleaved(variants, budget_s=budget_s)))
    for m in torch_models.values():
        m.to("cpu")
    del sacrificial
    return result


def _torch_call(model: nn.Module, inputs: dict, device: str) -> Callable[[], object]:
    @torch.no_grad()
    def call() -> object:
        out = model(**inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def verify(
    base: str | Path,
    adapter: str | Path | list[str | Path],
    onnx_dir: str | Path,
    *,
    weights: list[float] | None = None,
    allow_pickle: bool = False,
    report_path: str | Path | None = None,
    force: bool = False,
    options: VerifyOptions | None = None,
    log: Log = _quiet,
    **option_fields,
) -> Report:
    """Parity of ``onnx_dir`` (merged export) against base + adapter(s) unmerged, and latency.

    ``adapter`` is one path or a list; ``weights`` one weight per adapter (default 1.0 each).
    ``report_path``: write report.json there and report.md beside it (checked before any work,
    like every output; replaced only with ``force``, and only if verify wrote it). ``options``
    (or its fields as keywords): how to check. Returns the report; raises
    ``VerificationFailedError`` (with ``.report``, after writing it) when parity fails.
    """
    opts = options or VerifyOptions(**option_fields)  # checked before any work
    inputs = {
        "--base": base,
        "--adapter": _as_list(adapter),
        "--onnx": onnx_dir,
        "--eval-data": opts.eval_data,
    }
    plan = _plan_report(report_path, force, inputs) if report_path is not None else None
    _check_eval_data(opts.eval_data)
    onnx_path = require_dir(onnx_dir, "ONNX directory")
    meta = read_export_meta(onnx_path, ModelFormatError)  # once, bounded and type-checked
    weights_dtype = meta.get("weights_dtype")
    half = _half_dtype(weights_dtype)
    loaded = load_inputs(base, _as_list(adapter), allow_pickle, weights)
    merged = merged_model(loaded.base, loaded.adapters, loaded.weights, storage_dtype=half)
    report = _new_report(base, loaded, merged[1], None)
    _verify_into(
        report, loaded, merged[0], onnx_path, opts, log, weights_dtype if half else None, meta.get("exporter")
    )
    if plan is not None:
        write_files(plan, dict(zip(plan.targets, _report_texts(report), strict=True)))
    if report.passed is False:
        where = f"; report written to {plan.targets[1]}" if plan is not None else ""
        raise VerificationFailedError(f"{report.verdict}: {'; '.join(report.failures[:2])}{where}", report)
    return report


def _plan_report(path: str | Path, force: bool, inputs: dict) -> OutputPlan:
    """``--report FILE``: FILE (report.json) and FILE with the suffix .md beside it."""
    p = Path(path)
    if p.suffix == ".md":
        raise UsageError(
            f"--report {p} ends in .md: it names the JSON report, and the Markdown one is written "
            "beside it with the suffix .md; give e.g. --report report.json"
        )
    return plan_files([p, p.with_suffix(".md")], force=force, inputs=inputs, label="--report")


def _report_texts(report: Report) -> tuple[str, str]:
    """report.json and report.md, as written by every command."""
    return json.dumps(report.to_json(), indent=2) + "\n", report.to_markdown()


def _new_report(base: str | Path, loaded: Loaded, stats: MergeStats, export: ExportResult | None) -> Report:
    return Report(
        _base_info(base, loaded.family, loaded.base),
        [
            _adapter_info(a, w)
            for a, w in zip(loaded.adapters, loaded.weights or [1.0] * len(loaded.adapters), strict=True)
        ],
        merge=stats,
        export=export,
        machine=_machine(),
    )


def _verify_into(
    report: Report,
    loaded: Loaded,
    merged: nn.Module,
    onnx_path: Path,
    opts: VerifyOptions,
    log: Log,
    weights_dtype: str | None = None,
    exporter: str | None = None,
) -> None:
    """Add parity (per provider) and latency to ``report``; the comparison graphs for latency
    are exported with ``exporter``, the one the checked export was made with.

    With half-stored weights (``weights_dtype``), parity is judged against ``merged`` (the
    merged weights rounded to that dtype, which the file must hold exactly), and what the
    rounding costs against the unmerged model is added to the half-precision section.
    """
    family = loaded.family
    unmerged = unmerged_model(loaded.base, loaded.adapters, loaded.weights)
    providers = resolve_providers(opts.providers)
    threads = opts.threads or _machine()["cores"]
    sources = [s for s, _ in read_pairs(opts.eval_data)] if opts.eval_data else None
    torch.set_num_threads(threads)
    reference, what = (
        (merged, f"the {weights_dtype}-rounded merged model")
        if weights_dtype
        else (unmerged, "the unmerged model")
    )
    for provider in providers:
        log(f"parity [{provider}]: {opts.samples} cases against {what} (float32 and float64) …")
        # Opened inside and closed before the torch runs: never the session and the float64
        # model at once (memory stays near twice the weights).
        try:
            result = check_parity(
                family,
                reference,
                lambda p=provider: _open(onnx_path, p, threads),
                samples=opts.samples,
                seed=opts.seed,
                sources=sources,
                tokenizer=loaded.tokenizer,
            )
        except RuntimeInputError as e:  # the export does not run on this model's inputs
            raise InvalidInputError(str(e)) from e
        if weights_dtype:
            result.reference = (
                f"the merged model with its weights rounded to {weights_dtype} (what the file stores), "
                "in PyTorch float32; float64 for the noise floor. What the rounding costs against the "
                "unmerged model: see Half precision"
            )
        report.parity.append(result)
    half_dtypes = tuple(dict.fromkeys((*opts.half, *([weights_dtype] if weights_dtype else []))))
    for dtype in half_dtypes:
        log(f"half precision: what storing the merged weights in {dtype} costs …")
        stored = dtype == weights_dtype  # ``merged`` already holds these rounded weights: reuse it
        cast_err = max((m.cast_max_rel_err for m in report.merge.modules), default=0.0) if stored else None
        rows = half_precision_costs(
            family,
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
        kept = rows[0].adapter_retained
        if stored and kept is not None and kept < MIN_ADAPTER_RETAINED:
            report.half_failures.append(
                f"only {kept:.0%} of the adapter's effect on the outputs survives rounding the merged "
                f"weights to {dtype} (at least {MIN_ADAPTER_RETAINED:.0%} required); export in float32"
            )
    if not opts.latency:
        return
    with tempfile.TemporaryDirectory(prefix="loraexport-latency-") as td:
        dirs = {"onnx_merged": onnx_path}
        for name, model in (("onnx_base", loaded.base), ("onnx_unmerged", unmerged)):
            log(f"exporting {name.removeprefix('onnx_')} model for comparison …")
            d = Path(td) / name
            d.mkdir()
            export_model(family, model, d, exporter=exporter)
            dirs[name] = d
        torch_models = {"torch_unmerged": unmerged, "torch_merged": merged}
        for provider in providers:
            report.latency.append(
                measure_latency(
                    family,
                    provider,
                    threads,
                    torch_models,
                    dirs,
                    log,
                    opts.latency_budget_s,
                    opts.latency_points,
                )
            )


def write_report(report: Report, out_dir: Path) -> None:
    as_json, as_md = _report_texts(report)
    (out_dir / "report.json").write_text(as_json, encoding="utf-8")
    (out_dir / "report.md").write_text(as_md, encoding="utf-8")


# ---- merge-and-export ------------------------------------------------------------------------
def merge_and_export(
    base: str | Path,
    adapter: str | Path | list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    verify_output: bool = True,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str | None = None,
    allow_pickle: bool = False,
    options: VerifyOptions | None = None,
    log: Log = _quiet,
    **option_fields,
) -> Report:
    """Merge ``adapter`` into ``base``, export to ONNX, verify; write everything to ``out`` atomically.

    ``adapter`` is one path or a list (merged as ``W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` with ``weights``).
    ``dtype`` float16/bfloat16: the merged weights are rounded to it once and the ONNX file
    stores them in it (the graph computes in float32).
    ``options`` (or its fields as keywords: providers, samples, eval_data, ...): how to verify.
    Raises ``VerificationFailedError`` (after ``out`` is written) when parity fails.
    """
    half = _half_dtype(dtype)
    adapters = _as_list(adapter)
    opts = options or VerifyOptions(**option_fields)  # checked before any work
    inputs_ = {"--base": base, "--adapter": adapters, "--eval-data": opts.eval_data}
    plan = _plan(out, force, log, inputs_)
    _check_eval_data(opts.eval_data)
    log(f"loading {base} and {', '.join(map(str, adapters))} …")
    check_opset(opset, exporter or detect_family(base).exporter)  # before the weights are read
    loaded = load_inputs(base, adapters, allow_pickle, weights)
    merged, stats = merged_model(loaded.base, loaded.adapters, loaded.weights, storage_dtype=half)
    log(f"merged {stats.modules_merged} modules in {stats.seconds * 1e3:.1f} ms ({stats.compute_dtype})")
    inputs = {
        "base": {"path": str(base), "sha256": sha256_dir(Path(base))},
        "adapters": _adapter_inputs(loaded),
    }
    with write_output(plan) as tmp:
        log(f"exporting to ONNX ({exporter or loaded.family.exporter} exporter) …")
        result = export_model(loaded.family, merged, tmp, opset, exporter, dtype if half else None)
        log(f"exported {', '.join(result.files)} in {result.seconds:.1f} s")
        _copy_extra(loaded.family, Path(base), tmp)
        report = _new_report(base, loaded, stats, result)
        if verify_output:
            _verify_into(report, loaded, merged, tmp, opts, log, dtype if half else None, result.exporter)
        write_report(report, tmp)
        _write_provenance(tmp, inputs, {"mode": "merged"})
    if report.passed is False:
        raise VerificationFailedError(
            f"{report.verdict} ({'; '.join(report.failures[:2])}); "
            f"report written to {Path(out) / 'report.md'}",
            report,
        )
    return report
