"""The sections of ``report.json`` and ``report.md`` that render verification's results: the proof,
parity, the quality of a quantized export, latency. Numbers stay numbers until they are printed."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from loraexport.verify.latency import LatencyResult
from loraexport.verify.parity import ParityResult


def proof_markdown(manifest: dict | None, proof, manifest_failures: list[str]) -> list[str]:
    """``## Proof``: the files against ``loraexport.json``, then the weights against the reference."""
    lines = ["", "## Proof", ""]
    if manifest:
        ok = "✓" if not manifest_failures else "✗"
        lines.append(
            f"- {ok} files: {manifest.get('checked', 0)} files match the sha256 `loraexport.json` lists; "
            f"its own digest: {manifest.get('description', 'n/a')}"
        )
        lines += [f"  - {f}" for f in manifest_failures]
    if proof is not None:
        tensors = sum(f.tensors for f in proof.files)
        quantized = sum(f.quantized for f in proof.files)
        modules = sum(f.modules for f in proof.files)
        off = [o for f in proof.files for o in f.off_by_step]
        lines.append(
            f"- {'✓' if proof.passed else '✗'} weights: {tensors} tensors proven ({quantized} quantized "
            f"weights holding {modules} modules), {proof.method}; {proof.seconds:.1f} s"
        )
        if off:
            lines.append(
                "  - accepted one quantization step off: "
                + ", ".join(f"`{o['tensor']}` {o['codes']}/{o['of']}" for o in off[:6])
            )
        else:
            lines.append("  - every tensor bit-exact")
        lines += [f"  - {f}" for f in proof.failures]
    return lines


def quantization_markdown(rows: list, failures: list[str], budget) -> list[str]:
    """``## Quantization (quality)``: what quantizing costs against the unmerged float32 model."""
    gated = budget is not None and budget.set
    rule = (
        f"Judged against the budget given: {_budget(budget)}."
        if gated
        else "Reported, not judged: give --min-top1 or --min-adapter-retained to make them gates."
    )
    lines = [
        "",
        "## Quantization (quality)",
        "",
        "What quantizing costs: the quantized export as written (onnxruntime) against the unmerged "
        "float32 model (PyTorch). " + rows[0].how + f". Logit figures over {rows[0].positions} positions "
        f"of {rows[0].inputs}; generation over the generation prompts. {rule}",
        "",
        "| dtype | adapter | max abs err | rms err | top-1 | generation | adapter effect (rms) | "
        "adapter retained | effect error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for q in rows:
        lines.append(
            f"| {q.dtype} | {q.adapter} | {q.max_abs_err:.3g} | {q.rms_err:.3g} | {pct(q.top1_agreement)} | "
            f"{pct(q.generation_agreement)} | {q.adapter_effect_rms:.3g} | {pct(q.adapter_retained)} | "
            f"{pct(q.adapter_effect_error)} |"
        )
    if failures:
        lines += ["", "Failures:", *[f"- {f}" for f in failures]]
    return lines


def _budget(budget) -> str:
    parts = []
    if budget.min_top1 is not None:
        parts.append(f"top-1 ≥ {budget.min_top1:.0%}")
    if budget.min_adapter_retained is not None:
        low, high = budget.min_adapter_retained, 2 - budget.min_adapter_retained
        parts.append(f"adapter retained within [{low:.0%}, {high:.0%}]")
    return ", ".join(parts)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def sci(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def parity_json(p: ParityResult) -> dict[str, Any]:
    return {
        "passed": p.passed,
        "reference": p.reference,
        "provider": p.provider,
        "max_abs_err": p.max_abs_err,
        "max_rel_err": p.max_rel_err,
        "min_cosine": p.min_cosine,
        "top1_agreement": p.top1_agreement,
        "generation_agreement": p.generation.agreement if p.generation else None,
        "generation": asdict(p.generation) if p.generation else None,
        "tolerance": {
            "rule": "onnx_err_vs_fp64 <= noise_multiple * max(torch_fp32_err_vs_fp64, "
            "stored_err_vs_fp64, floor_ulps * eps32 * max|ref|)",
            "noise_multiple": p.noise_multiple,
            "floor_ulps": _const("FLOOR_ULPS"),
        },
        "failures": p.failures,
        "as_written": p.as_written,
        "cases": [
            {
                "name": c.name,
                "batch": c.batch,
                "seq": c.seq,
                "passed": c.passed,
                "outputs": [asdict(o) for o in c.outputs],
            }
            for c in p.cases
        ],
    }


def _const(name: str) -> float:
    from loraexport.verify import parity

    return getattr(parity, name)


def latency_json(lat: LatencyResult) -> dict[str, Any]:
    return {
        "provider": lat.provider,
        "threads": lat.threads,
        "onnxruntime_spinning": lat.spinning,
        "unit": "ms",
        "cases": [
            {
                "batch": c.batch,
                "seq": c.seq,
                "p50": {v: s.p50_ms for v, s in c.stats.items()},
                "p90": {v: s.p90_ms for v, s in c.stats.items()},
                "iqr": {v: s.iqr_ms for v, s in c.stats.items()},
                "runs": {v: s.runs for v, s in c.stats.items()},
                "ratios": {
                    "onnx_merged/onnx_base": c.ratio("onnx_merged", "onnx_base"),
                    "onnx_merged/torch_unmerged": c.ratio("onnx_merged", "torch_unmerged"),
                    "onnx_unmerged/onnx_merged": c.ratio("onnx_unmerged", "onnx_merged"),
                },
            }
            for c in lat.cases
        ],
    }
