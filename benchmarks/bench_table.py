"""`make bench`'s outputs from its results dict: the Markdown table, the JSON, the PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

POINTS = ((1, 128), (4, 128), (1, 512))


def point_key(batch: int, seq: int) -> str:
    return f"b{batch}x{seq}"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _ratio_eff(ratio: float | None, eff: float | None) -> str:
    parts = []
    if ratio is not None:
        parts.append(f"{ratio:.2f}×")
    if eff is not None:
        parts.append(f"{100 * eff:.0f}%")
    return " · ".join(parts) or "—"


def _model_header(m: dict, ncols: int) -> str:
    w = m.get("work") or {}
    bits = [f"**{m['label']}**"]
    if w:
        bits.append(
            f"{w['params'] / 1e6:.0f} M parameters, {w['weight_bytes_fp32'] / 1e6:.0f} MB of float32 "
            f"weights read per token, {w['gflop_b1x128']:.1f} GFLOP per b1×128 pass"
        )
    if m.get("skipped"):
        bits.append(f"skipped: {m['skipped']}")
    return "| " + "; ".join(bits) + " |" + " |" * (ncols - 1)


def _partial_logits(r: dict) -> bool:
    return any(p["logit_positions"] != int(k.split("x")[1]) for k, p in (r.get("prompt") or {}).items())


def markdown(results: dict) -> str:
    c = results["ceilings"]
    partial = any(_partial_logits(r) for m in results["models"] for r in m.get("rows", []))
    logits = (
        "full logits (B, T, vocab) on every side, except rows marked ‡ (fewer positions)"
        if partial
        else "full logits (B, T, vocab) on every side"
    )
    head = ["variant"]
    for b, s in POINTS:
        head += [f"b{b}×{s} ms p50 (IQR)", "× PEFT · % peak"]
    head += ["decode tok/s (IQR)", "× PEFT · % BW"]
    lines = [
        f"Prompt pass: {logits}. Decode: {results['decode']['prompt']}-token "
        f"prompt, {results['decode']['new_tokens']} new tokens, batch 1, greedy, end to end. "
        f"{results['threads']} threads everywhere. "
        f"Ceilings measured in this run (the higher of before and after the models): float32 GEMM "
        f"{c['gemm_gflops']:.0f} GFLOP/s (onnxruntime MatMul {c['gemm_n']}³; torch.mm reaches "
        f"{c['torch_gemm_gflops']:.0f}), read {c['read_gbps']:.1f} GB/s (onnxruntime ReduceSum, "
        f"{c['buffer_mb']} MB), copy {c['copy_gbps']:.1f} GB/s (numpy).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for m in results["models"]:
        lines.append(_model_header(m, len(head)))
        for r in m.get("rows", []):
            if not r["available"]:
                lines.append(f"| {r['label']} | {r['note']} |" + " |" * (len(head) - 2))
                continue
            cells = [r["label"] + (" ‡" if _partial_logits(r) else "")]
            for b, s in POINTS:
                p = r["prompt"].get(point_key(b, s))
                if p is None:
                    cells += ["—", "—"]
                else:
                    cells += [
                        f"{_fmt_ms(p['p50_ms'])} ({_fmt_ms(p['iqr_ms'])})",
                        _ratio_eff(p["ratio"], p["eff"]),
                    ]
            d = r.get("decode")
            if d is None:
                cells += ["—", "—"]
            else:
                cells += [
                    f"{d['tok_s']:.1f} ({100 * d['iqr_rel']:.0f}%)",
                    _ratio_eff(d["ratio"], d["bw_eff"]),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *notes(results)]
    return "\n".join(lines) + "\n"


def _agreement(points: dict) -> str:
    """Top-1 agreement over all positions of all prompt points, and the largest |Δlogit|."""
    n = sum(a["positions"] for a in points.values())
    top1 = sum(a["top1"] * a["positions"] for a in points.values()) / n
    return f"{100 * top1:.1f}% (max abs {max(a['max_abs'] for a in points.values()):.1e})"


def notes(results: dict) -> list[str]:
    out = [
        "× PEFT: PEFT eager unmerged's median time / the row's (prompt), or the row's tok/s / PEFT's "
        "(decode); above 1 is faster. Rows marked ‡ compute the last position's logits only and are "
        "compared with PEFT doing the same (`logits_to_keep=1`, the row below PEFT's). "
        "IQR: interquartile range of the interleaved runs (decode: of "
        "the time, relative). % peak: the pass's FLOPs / median time / the GEMM peak above. % BW: "
        "bytes of weights read per decoded token (as stored: float32, int8, int4 + scales) × tok/s / "
        "the read bandwidth above; end to end, so the prompt pass counts against it.",
        "",
    ]
    for m in results["models"]:
        rows = [r for r in m.get("rows", []) if r.get("available")]
        if not rows:
            continue
        mb = ", ".join(f"{r['label']} {r['weight_bytes_per_token'] / 1e6:.0f}" for r in rows)
        same = ", ".join(
            f"{r['label']} {r['decode']['same_prefix_as_peft']}" for r in rows[1:] if r.get("decode")
        )
        agree = ", ".join(f"{r['label']} {_agreement(r['vs_peft'])}" for r in rows[1:] if r.get("vs_peft"))
        exp = ", ".join(f"{r['label']} {r['export_s']:.1f}" for r in rows if r.get("export_s") is not None)
        o = m.get("cpu_others") or {}
        out.append(f"- {m['label']}: MB of weights read per token: {mb}.")
        if m.get("points_note"):
            out.append(f"  Prompt passes: {m['points_note']}.")
        out.append(
            f"  Greedy tokens identical to PEFT eager's before the first difference "
            f"(of {results['decode']['new_tokens']}; one random prompt): {same}."
        )
        if agree:
            n = max(sum(a["positions"] for a in r.get("vs_peft", {}).values()) for r in rows)
            out.append(f"  Top-1 agreement with PEFT eager's prompt logits ({n} positions): {agree}.")
        if exp:
            out.append(f"  Export seconds (in-process `export()`, when made): {exp}.")
        if o:
            loud = " — **not a quiet machine: these figures are disturbed**" if o["others"] > 0.1 else ""
            out.append(
                f"  Other processes used {100 * o['others']:.0f}% of the cores while it was timed "
                f"(steal {100 * o['steal']:.0f}%){loud}."
            )
        for r in rows:
            if r.get("detail"):
                out.append(f"  {r['label']}: {r['detail']}.")
    return out


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results["models"] if m.get("rows") and not m.get("skipped")]
    if not models:
        return
    cols = [point_key(b, s) for b, s in POINTS] + ["decode"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rows = [r for r in m["rows"] if r["available"]]
        width = 0.8 / max(len(rows), 1)
        for i, r in enumerate(rows):
            vals = [(r["prompt"].get(k) or {}).get("ratio") or 0.0 for k in cols[:-1]]
            vals.append((r.get("decode") or {}).get("ratio") or 0.0)
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
            ax.bar(xs, vals, width, label=r["label"])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cols)), ["b1×128", "b4×128", "b1×512", "decode tok/s"])
        ax.set_ylabel("speed-up over PEFT eager unmerged (×)")
        ax.set_title(m["label"], fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"make bench, {results['machine']['cpu']}, {results['threads']} threads, {results['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def race_markdown(results: dict) -> str:
    """The race against onnxruntime-genai's builder (bench_builder), one row per file and runner."""
    out = []
    for m in results["models"]:
        race = m.get("race")
        if not race:
            continue
        spin = "on" if race["spinning"] else "off"
        out += [
            f"**{m['label']}: against onnxruntime-genai's model builder.** Decode end to end "
            f"({results['decode']['prompt']}-token prompt, {results['decode']['new_tokens']} greedy "
            f"tokens, batch 1), interleaved, {race['threads']} threads; onnxruntime's thread spinning: "
            f"{spin}, the same on both sides.",
            "",
            "| row | decode tok/s (IQR) | × builder int4 | % BW | MB read per token | file MB | export s "
            "| tokens as PEFT's |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in race["rows"]:
            d = r.get("decode")
            if not d:
                out.append(f"| {r['label']} | {r['note'] or 'not timed'} |" + " |" * 6)
                continue
            vs = f"{d['vs_builder_int4']:.2f}×" if d.get("vs_builder_int4") else "—"
            bw = f"{100 * d['bw_eff']:.0f}%" if d.get("bw_eff") is not None else "—"
            exp = f"{r['export_s']:.1f}" if r.get("export_s") is not None else "—"
            if r.get("export_s") is not None and "reused" in r.get("export_note", ""):
                exp += " (when made)"
            same = d["same_prefix_as_peft"]
            cells = [
                r["label"],
                f"{d['tok_s']:.1f} ({100 * d['iqr_rel']:.0f}%)",
                vs,
                bw,
                f"{r['weight_bytes_per_token'] / 1e6:.0f}",
                f"{r['file_bytes'] / 1e6:.0f}",
                exp,
                f"{same}/{results['decode']['new_tokens']}" if same is not None else "—",
            ]
            out.append("| " + " | ".join(cells) + " |")
        merge = race.get("merge_s")
        busy = (race.get("cpu_others") or {}).get("others")
        out += [
            "",
            f"Other processes used {100 * busy:.0f}% of the cores meanwhile. " if busy is not None else "",
            "File: the graphs and their external data. Export: each its own process, interpreter and "
            "imports included; the builder's input, the merged model saved as a Hugging Face folder, "
            + (f"took {merge:.1f} s more to save." if merge is not None else "")
            + " Tokens as PEFT's: greedy tokens identical to PEFT eager's before the first difference.",
            "",
        ]
    return "\n".join(out)
