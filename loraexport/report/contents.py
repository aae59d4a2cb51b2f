"""``report.json`` (schema 1, for scripts) and ``report.md`` (for people).

The JSON fields listed in ARCHITECTURE.md are a contract: scripts and CI pipelines read them.
Numbers are stored as numbers; they are formatted only when rendered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loraexport.artifact.provenance import versions
from loraexport.core.memory import stages_markdown
from loraexport.export.onnx import ExportResult
from loraexport.lora.merge import MergeStats
from loraexport.verify import gates
from loraexport.verify.adapters import AdapterModeResult
from loraexport.verify.gates import Budget
from loraexport.verify.half import HalfCost
from loraexport.verify.latency import LatencyResult
from loraexport.verify.parity import ParityResult
from loraexport.verify.proof import Proof
from loraexport.verify.quantized import QuantCost
from loraexport.verify.render import (
    latency_json,
    parity_json,
    pct,
    proof_markdown,
    quantization_markdown,
    ratio,
    sci,
)

SCHEMA = 1
LATENCY_VARIANTS = ("torch_unmerged", "torch_merged", "onnx_merged", "onnx_base", "onnx_unmerged")
OPTIONAL_VARIANTS = ("onnx_merged_fp16",)  # CUDA: the merged export computing in float16


@dataclass
class Report:
    base: dict[str, Any]
    adapters: list[dict[str, Any]]
    merge: MergeStats | None = None
    export: ExportResult | None = None
    parity: list[ParityResult] = field(default_factory=list)  # one per provider
    latency: list[LatencyResult] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    half: list[HalfCost] = field(default_factory=list)  # verify --half, and --dtype exports
    # a half-precision export whose rounding loses the adapter (verify.gates.MIN_ADAPTER_RETAINED)
    half_failures: list[str] = field(default_factory=list)
    quantization: list[QuantCost] = field(default_factory=list)  # --quantize exports
    quantization_failures: list[str] = field(default_factory=list)  # the adapter lost to quantization
    adapter_mode: AdapterModeResult | None = None  # --mode adapter: loading, activation, latency
    # each stage's wall time and peak resident memory (``memory.Stage``), and the run's memory
    # facts: weights' bytes, the process's peak (a streamed run: ``stages.sources``)
    stages: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was checked how, in a sentence each
    # verify of an export on disk: its files against loraexport.json (``manifest.check_manifest``)
    manifest: dict[str, Any] | None = None
    proof: Proof | None = None  # a quantized export, weight by weight (``verify.proof``)
    budget: Budget | None = None  # what the user allows a lossy export to cost (``verify.gates``)
    warnings: list[str] = field(default_factory=list)  # said, not judged

    @property
    def passed(self) -> bool | None:
        """None when nothing was checked (``--no-verify``); False when any rule failed (``verify.gates``)."""
        return gates.passed(self)

    @property
    def failures(self) -> list[str]:
        """Every failed rule, proofs first, each prefixed by what it checks."""
        return gates.failures(self)

    @property
    def verdict(self) -> str:
        """What failed first (or ``passed``), for a one-line message."""
        return gates.verdict(self)

    # ---- JSON -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "versions": versions(),
            "machine": self.machine,
            "base": self.base,
            "adapters": self.adapters,
        }
        if self.merge is not None:
            m = self.merge
            out["merge"] = m.to_json()
        if self.export is not None:
            e = self.export
            flat_in = list(dict.fromkeys(n for names in e.inputs.values() for n in names))
            flat_out = list(dict.fromkeys(n for names in e.outputs.values() for n in names))
            out["export"] = {
                "files": e.files,
                "opset": e.opset,
                "seconds": e.seconds,
                "bytes": e.bytes,
                "inputs": flat_in,
                "outputs": flat_out,
                "graphs": {g: {"inputs": e.inputs[g], "outputs": e.outputs[g]} for g in e.inputs},
            }
        out["checks"] = gates.checks(self)
        out["manifest"] = self.manifest
        out["proof"] = self.proof.to_json() if self.proof is not None else None
        out["parity"] = parity_json(self.parity[0]) if self.parity else None
        if len(self.parity) > 1:
            out["parity_by_provider"] = {p.provider: parity_json(p) for p in self.parity}
        out["latency"] = latency_json(self.latency[0]) if self.latency else None
        if len(self.latency) > 1:
            out["latency_by_provider"] = {lat.provider: latency_json(lat) for lat in self.latency}
        out["half_precision"] = [asdict(h) for h in self.half] or None
        out["half_precision_failures"] = self.half_failures
        out["quantization"] = [asdict(q) for q in self.quantization] or None
        out["quantization_failures"] = self.quantization_failures
        out["quality_budget"] = self.budget.to_json() if self.budget is not None else None
        out["warnings"] = self.warnings
        out["adapter_mode"] = self.adapter_mode.to_json() if self.adapter_mode else None
        out.update(
            {k: v for k, v in (("stages", self.stages), ("memory", self.memory), ("notes", self.notes)) if v}
        )
        out["passed"] = self.passed
        return out

    # ---- Markdown ---------------------------------------------------------------------
    def to_markdown(self) -> str:
        lines = ["# loraexport report", ""]
        verdict = {True: "**PASSED**", False: "**FAILED**", None: "not verified"}[self.passed]
        lines += [
            f"Verification: {verdict}" + (f" ({self.verdict})" if self.passed is False else ""),
            "",
            f"- base: `{self.base['path']}` ({self.base['family']}, {self.base['parameters']:,} parameters)",
        ]
        for a in self.adapters:
            lines.append(
                f"- adapter: `{a['path']}` (r={a['r']}, alpha={a['alpha']:g}, targets "
                f"{a['targets']}, {a['modules']} modules, "
                + (f"weight {a['weight']:g}, " if a.get("weight", 1.0) != 1.0 else "")
                + f"sha256 {a['sha256'][:12]}…)"
            )
        if self.machine:
            lines.append(f"- machine: {self.machine.get('cpu', '?')}, {self.machine.get('cores', '?')} cores")
        lines += [f"- {n}" for n in self.notes] + stages_markdown(self.stages, self.memory)
        lines += [f"- **warning**: {w}" for w in self.warnings]
        if self.merge is not None:
            m = self.merge
            lines += [
                "",
                "## Merge",
                "",
                f"{m.modules_merged} modules merged in {m.seconds * 1e3:.1f} ms; computed in "
                f"{m.compute_dtype}, stored in {m.storage_dtype}.",
                "",
                "| module | max abs ΔW | max abs W0 | cast error (abs) | cast error (rel) |",
                "|---|---:|---:|---:|---:|",
            ]
            for x in m.modules:
                lines.append(
                    f"| `{x.module}` | {x.max_abs_delta:.3g} | {x.max_abs_weight:.3g} | "
                    f"{x.cast_max_abs_err:.2g} | {x.cast_max_rel_err:.2g} |"
                )
        if self.export is not None:
            e = self.export
            lines += [
                "",
                "## Export",
                "",
                f"Files {', '.join(f'`{f}`' for f in e.files)}: "
                f"{e.bytes / 1e6:.2f} MB, opset {e.opset}, {e.seconds:.1f} s.",
            ]
            for g in e.inputs:
                lines.append(
                    f"- `{g}.onnx`: inputs {', '.join(e.inputs[g][:4])}"
                    f"{' …' if len(e.inputs[g]) > 4 else ''}; outputs "
                    f"{', '.join(e.outputs[g][:3])}{' …' if len(e.outputs[g]) > 3 else ''}"
                )
        if self.manifest or self.proof is not None:
            lines += proof_markdown(self.manifest, self.proof, gates.manifest_failures(self.manifest))
        for p in self.parity:
            lines += [
                "",
                f"## Parity ({p.provider})",
                "",
                f"Reference: {p.reference}. An output passes "
                "when its error against float64 is within the tolerance derived from torch "
                "float32's own error (see `loraexport/verify/parity.py`).",
                "",
                "| case | output | max abs err | max rel err | min cosine | top-1 | err vs fp64 "
                "(onnx / torch) | tolerance | ok |",
                "|---|---|---:|---:|---:|---:|---:|---:|:-:|",
            ]
            for c in p.cases:
                for o in c.outputs:
                    if not (o.output.endswith("logits") or not o.passed):
                        continue
                    top1 = "" if o.top1_agreement is None else f"{o.top1_agreement:.1%}"
                    lines.append(
                        f"| {c.name} | {o.output} | {o.max_abs_err:.2e} | {o.max_rel_err:.2e} | "
                        f"{o.min_cosine:.7f} | {top1} | {sci(o.onnx_err_vs_fp64)} / "
                        f"{sci(o.torch_err_vs_fp64)} | {o.tolerance:.2e} | "
                        f"{'✓' if o.passed else '✗'} |"
                    )
            n_out = sum(len(c.outputs) for c in p.cases)
            lines.append(
                f"\n{n_out} outputs compared (logits shown; cache and encoder outputs listed "
                "only when they fail); all in report.json."
            )
            if p.generation:
                g = p.generation
                lines.append(
                    f"\nGreedy decoding (onnxruntime with KV cache vs torch unmerged): "
                    f"{g.identical_rows}/{g.rows} rows identical, up to {g.max_new_tokens} new tokens."
                    + (f" {g.tied_rows} parted at a tie (either token is right):" if g.tied_rows else "")
                )
                lines += [f"- {t}" for t in g.ties]
                if g.task_rows:
                    n, on, ref = g.task_rows, g.task_exact_onnx, g.task_exact_reference
                    lines.append(
                        f"\nHeld-out exact match (`--eval-data` targets, greedy text up to <eos>): "
                        f"onnxruntime {on}/{n} ({on / n:.1%}), torch unmerged {ref}/{n} ({ref / n:.1%})."
                    )
            if p.as_written:
                w = p.as_written
                lines.append(
                    "\nThe file as written (int8 activations) against itself computing in float32: max "
                    f"abs difference {w['max_abs_diff']:.3g}, rms {w['rms_diff']:.3g}, top-1 "
                    f"{pct(w['top1_agreement'])} (measured, not judged: the kernels' integer arithmetic)."
                )
            if p.failures:
                lines += ["", "Failures:", *[f"- {f}" for f in p.failures]]
        if self.half:
            lines += [
                "",
                "## Half precision (informational)",
                "",
                "Against the unmerged float32 model. `merged`: W0 + s·B·A stored in the dtype; "
                "`base_only`: base weights in the dtype, LoRA branches in float32 (the dtype's own cost); "
                "`no_adapter`: the float32 base alone (how far the adapter moves the outputs). "
                "Adapter retained: 1 − rms(merged) / rms(no_adapter), the share of the adapter's effect "
                "that survives the rounding.",
                "",
                "| dtype | variant | max abs err | rms err | top-1 | generation | max cast rel err | "
                "adapter retained |",
                "|---|---|---:|---:|---:|---:|---:|---:|",
            ]
            for h in self.half:
                lines.append(
                    f"| {h.dtype} | {h.variant} | {h.max_abs_err:.3g} | {h.rms_err:.3g} | "
                    f"{pct(h.top1_agreement)} | {pct(h.generation_agreement)} | {sci(h.max_cast_rel_err)} | "
                    f"{pct(h.adapter_retained)} |"
                )
            if self.half_failures:
                lines += ["", "Failures:", *[f"- {f}" for f in self.half_failures]]
        if self.quantization:
            lines += quantization_markdown(self.quantization, self.quantization_failures, self.budget)
        for lat in self.latency:
            shown = LATENCY_VARIANTS + tuple(
                v for v in OPTIONAL_VARIANTS if any(v in c.stats for c in lat.cases)
            )
            lines += [
                "",
                f"## Latency ({lat.provider}, {lat.threads} threads, ms)",
                "",
                "Medians (p90) of interleaved runs after warm-up. onnxruntime's threads "
                + ("spin" if lat.spinning else "do not spin")
                + " between runs (torch runs in turn on the same cores; an app's `OnnxModel` lets them"
                " spin).",
                "",
                "| batch × seq | " + " | ".join(shown) + " | onnx merged / base | "
                "onnx merged / torch unmerged |",
                "|---|" + "---:|" * (len(shown) + 2),
            ]
            for c in lat.cases:
                cells = [
                    f"{c.stats[v].p50_ms:.3f} ({c.stats[v].p90_ms:.3f})" if v in c.stats else "–"
                    for v in shown
                ]
                r1, r2 = c.ratio("onnx_merged", "onnx_base"), c.ratio("onnx_merged", "torch_unmerged")
                lines.append(
                    f"| {c.batch} × {c.seq} | " + " | ".join(cells) + f" | {ratio(r1)} | {ratio(r2)} |"
                )
        if self.adapter_mode is not None:
            lines += ["", *self.adapter_mode.markdown()]
        return "\n".join(lines) + "\n"

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("base", f"{self.base['path']} ({self.base['family']})")]
        if self.merge:
            rows.append(
                (
                    "merged",
                    f"{self.merge.modules_merged} modules ({self.merge.compute_dtype} → "
                    f"{self.merge.storage_dtype})",
                )
            )
        if e := self.export:
            size = f"{e.bytes / 1e6:.2f} MB, opset {e.opset}, {e.seconds:.1f} s"
            rows.append(("exported", f"{', '.join(e.files)} ({size})"))
        if self.manifest:
            bad = gates.manifest_failures(self.manifest)
            rows.append(("files", f"{'FAILED' if bad else 'PASSED'}: {self.manifest.get('checked', 0)} "
                         "match loraexport.json" + (f" ({bad[0]})" if bad else "")))  # fmt: skip
        if (proof := self.proof) is not None:
            n = sum(f.tensors for f in proof.files)
            text = f"PASSED: {n} tensors proven against the reference"
            text = text if proof.passed else f"FAILED: {proof.failures[0]}"
            rows.append(("proof", text))
        for p in self.parity:
            text = f"{'PASSED' if p.passed else 'FAILED'}: max abs err {p.max_abs_err:.2e}"
            if p.top1_agreement is not None:
                text += f", top-1 {p.top1_agreement:.1%}"
            if g := p.generation:
                text += f", generation {g.identical_rows}/{g.rows}"
                text += f" (+{g.tied_rows} tied)" if g.tied_rows else ""
                text += f", held-out exact match {g.task_exact_onnx}/{g.task_rows}" if g.task_rows else ""
            rows.append((f"parity [{p.provider}]", text))
        for q in self.quantization:
            rows.append(
                (
                    f"quantized {q.dtype}",
                    f"adapter {q.adapter}: top-1 {pct(q.top1_agreement)} against the unmerged float32 "
                    f"model, adapter retained {pct(q.adapter_retained)}, max abs err {q.max_abs_err:.3g}, "
                    f"generation {pct(q.generation_agreement)}",
                )
            )
        for lat in self.latency:
            for c in lat.cases:
                rows.append(
                    (
                        f"latency [{lat.provider}] {c.batch}×{c.seq}",
                        f"onnx merged {c.stats['onnx_merged'].p50_ms:.2f} ms, merged/base "
                        f"{ratio(c.ratio('onnx_merged', 'onnx_base'))}, vs torch unmerged "
                        f"{ratio(c.ratio('onnx_merged', 'torch_unmerged'))}",
                    )
                )
        rows += [("warning", w) for w in self.warnings]
        return rows
