"""Issue 25's acceptance rows from `make bench`'s results: each target, what this run measured
(with the spread of what it divides) and whether it holds. Pure: a results dict in, rows out."""

from __future__ import annotations

from dataclasses import dataclass

WALL_LIMIT_S = 15 * 60  # make bench's own budget (issue 25)
PROMPT_POINT = "b1x128"


@dataclass(frozen=True)
class Target:
    what: str
    limit: float
    at_least: bool  # the measured value must be ≥ limit (else ≤ limit)
    unit: str = "×"

    @property
    def goal(self) -> str:
        shown = f"{100 * self.limit:.0f}%" if self.unit == "%" else f"{self.limit:g}{self.unit}"
        return ("≥ " if self.at_least else "≤ ") + shown


@dataclass(frozen=True)
class Verdict:
    target: Target
    value: float | None  # None: not measured (``shown`` says why)
    shown: str

    @property
    def holds(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target.limit if self.target.at_least else self.value <= self.target.limit

    @property
    def word(self) -> str:
        return {True: "holds", False: "does not hold", None: "not measured"}[self.holds]

    def as_dict(self) -> dict:
        t = self.target
        return dict(target=t.what, goal=t.goal, value=self.value, measured=self.shown, verdict=self.word)


def _model(results: dict, key: str) -> dict:
    return next((m for m in results.get("models", []) if m.get("key") == key), {})


def _row(rows: list[dict], key: str) -> dict:
    return next((r for r in rows if r.get("key") == key), {})


def _ms(p: dict) -> str:
    return f"{p['p50_ms']:.0f} ms (IQR {p['iqr_ms']:.0f})"


def _tok(d: dict) -> str:
    return f"{d['tok_s']:.1f} tok/s (IQR {100 * d['iqr_rel']:.0f}%)"


def prompt_ratio(results: dict, model: str, key: str, label: str) -> Verdict:
    """The b1×128 prompt pass of export ``key`` ÷ the same model's float32 --optimize."""
    target = Target(f"{label}: b1×128 prompt pass ÷ our float32 `--optimize`", 0.6, at_least=False)
    rows = _model(results, model).get("rows", [])
    p = (_row(rows, key).get("prompt") or {}).get(PROMPT_POINT)
    ref = (_row(rows, "onnx_opt").get("prompt") or {}).get(PROMPT_POINT)
    if not p or not ref:
        return Verdict(target, None, f"no {key} or onnx_opt b1×128 row in this run")
    value = p["p50_ms"] / ref["p50_ms"]
    shown = f"{value:.2f}× ({_ms(p)} ÷ {_ms(ref)})"
    dyn = (_row(rows, DYNAMIC).get("prompt") or {}).get(PROMPT_POINT) if key == "onnx_opt_int8" else None
    if dyn:  # the integer-GEMM int8 beside it: what the kernels allow, at its accuracy
        shown += f"; int8-dynamic (activations int8 per token): {dyn['p50_ms'] / ref['p50_ms']:.2f}×"
    return Verdict(target, value, shown)


DYNAMIC = "onnx_opt_int8d"  # bench.py's int8-dynamic row


def _race(results: dict) -> tuple[dict, dict]:
    """Our int4 row and the builder's; without a race, two rows whose note says why."""
    model = _model(results, "smollm2")
    if not model.get("race"):
        why = {"note": model.get("race_note") or model.get("skipped") or "no race in this run"}
        return why, why
    rows = model["race"]["rows"]
    return _row(rows, "ours_int4"), _row(rows, "builder_int4")


def decode_vs_builder(results: dict) -> Verdict:
    target = Target("SmolLM2 shape: int4 decode, loraexport.runtime ÷ builder int4 (genai)", 2.0, True)
    ours, theirs = _race(results)
    if not ours.get("decode") or not theirs.get("decode"):
        return Verdict(target, None, ours.get("note") or theirs.get("note") or "not timed")
    value = ours["decode"]["tok_s"] / theirs["decode"]["tok_s"]
    return Verdict(target, value, f"{value:.2f}× ({_tok(ours['decode'])} ÷ {_tok(theirs['decode'])})")


def bandwidth_share(results: dict) -> Verdict:
    target = Target("SmolLM2 shape: int4 decode, share of read bandwidth for its own bytes", 0.6, True, "%")
    ours, _ = _race(results)
    d = ours.get("decode")
    if not d or d.get("bw_eff") is None:
        return Verdict(target, None, ours.get("note") or "not timed")
    bw = results["ceilings"]["read_gbps"]
    mb = ours["weight_bytes_per_token"] / 1e6
    shown = f"{100 * d['bw_eff']:.0f}% ({mb:.0f} MB/token × {d['tok_s']:.1f} tok/s ÷ {bw:.1f} GB/s)"
    return Verdict(target, d["bw_eff"], shown)


def file_ratio(results: dict) -> Verdict:
    target = Target("SmolLM2 shape: int4 file bytes, ours ÷ builder's", 1.25, at_least=False)
    ours, theirs = _race(results)
    if not ours.get("file_bytes") or not theirs.get("file_bytes"):
        return Verdict(target, None, ours.get("note") or theirs.get("note") or "not measured")
    value = ours["file_bytes"] / theirs["file_bytes"]
    shown = f"{value:.2f}× ({ours['file_bytes'] / 1e6:.0f} MB ÷ {theirs['file_bytes'] / 1e6:.0f} MB)"
    prose, _ = _prose(results)  # the same files of the real model, in --block-size 64
    b64, builder = prose.get("ours_int4_b64", {}), prose.get("builder_int4", {})
    if b64.get("file_bytes") and builder.get("file_bytes") and "top1" in b64:
        shown += (
            f"; `--block-size 64`: {b64['file_bytes'] / builder['file_bytes']:.2f}× on the real model, "
            f"prose top-1 {_pct(b64)}"
        )
    return Verdict(target, value, shown)


def export_ratio(results: dict) -> Verdict:
    target = Target("SmolLM2 shape: int4 export wall time, ours ÷ builder's", 1.0, at_least=False)
    ours, theirs = _race(results)
    if ours.get("export_s") is None or theirs.get("export_s") is None:
        return Verdict(target, None, ours.get("note") or theirs.get("note") or "not measured")
    value = ours["export_s"] / theirs["export_s"]
    runs = [len(p.get("export_runs") or [None]) for p in (ours, theirs)]
    how = "one each" if runs == [1, 1] else f"medians of {min(runs)} alternated"
    spread = "; ".join(
        f"{who} {_spread(p.get('export_runs'))}" for who, p in (("ours", ours), ("builder's", theirs))
        if len(p.get("export_runs") or []) > 1
    )  # fmt: skip
    spread = f"; runs {spread}" if spread else ""
    times = f"{ours['export_s']:.1f} s ÷ {theirs['export_s']:.1f} s"
    shown = f"{value:.2f}× ({times}, {how}, own processes{spread})"
    return Verdict(target, value, shown)


def _spread(runs: list[float]) -> str:
    return f"{min(runs):.1f}–{max(runs):.1f} s"


def minilm_cosine(results: dict, variant: str, limit: float) -> Verdict:
    """The real MiniLM's worst sentence-embedding cosine of ``variant`` against PEFT float32."""
    what = f"Real MiniLM (never quantized), {variant}: worst embedding cosine vs PEFT fp32"
    target = Target(what, limit, True, "")
    m = results.get("minilm") or {}
    row = (m.get("variants") or {}).get(variant)
    if not row:
        return Verdict(target, None, m.get("note") or "not measured")
    shown = (
        f"{row['min_cos']:.4f} (median {row['median_cos']:.4f}; nearest neighbour as PEFT's "
        f"{100 * row['nn_same']:.0f}%, {m['sentences']} sentences)"
    )
    return Verdict(target, row["min_cos"], shown)


def wall(results: dict) -> Verdict:
    target = Target("`make bench` wall time (to the table)", WALL_LIMIT_S, at_least=False, unit=" s")
    s = results.get("wall_s")
    if s is None:
        return Verdict(target, None, "no wall time")
    return Verdict(target, s, f"{s:.0f} s ({s / 60:.1f} min)")


def _prose(results: dict) -> tuple[dict, str]:
    """The real SmolLM2's prose rows by key (bench_prose), or why there are none."""
    model = _model(results, "real")
    prose = model.get("prose")
    if not prose:
        return {}, model.get("prose_note") or model.get("skipped") or "no real SmolLM2 in this run"
    return {r["key"]: r for r in prose["rows"]}, ""


def _pct(r: dict) -> str:
    return f"{100 * r['top1']:.1f}%"


def _kept(r: dict) -> str:
    return f"{r['kept']}/{r['decisions']}"


def prose_top1_over_builder(results: dict) -> Verdict:
    target = Target("Real SmolLM2 prose, int4 top-1 agreement − builder int4's (points)", 10, True, " pts")
    rows, why = _prose(results)
    ours, theirs = rows.get("ours_int4", {}), rows.get("builder_int4", {})
    if "top1" not in ours or "top1" not in theirs:
        return Verdict(target, None, why or ours.get("note") or theirs.get("note") or "not measured")
    value = 100 * (ours["top1"] - theirs["top1"])
    return Verdict(target, value, f"{value:+.1f} pts ({_pct(ours)} − {_pct(theirs)}, of {ours['positions']})")


def prose_top1(results: dict, key: str, label: str, limit: float) -> Verdict:
    target = Target(f"Real SmolLM2 prose, {label} top-1 agreement", limit, True, "%")
    rows, why = _prose(results)
    r = rows.get(key, {})
    if "top1" not in r:
        return Verdict(target, None, why or r.get("note") or "not measured")
    return Verdict(target, r["top1"], f"{_pct(r)} of {r['positions']} positions")


PROSE_LABELS = {"ours_int4_keep": "`--keep-adapter`", "builder_int4": "builder int4"}


def prose_kept(results: dict, key: str, label: str, limit: float, beside: tuple[str, ...] = ()) -> Verdict:
    """``key``'s share of the adapter's decisions kept; the rows ``beside`` quoted after it."""
    target = Target(f"Real SmolLM2 prose, {label} adapter decisions kept", limit, True, "%")
    rows, why = _prose(results)
    r = rows.get(key, {})
    if r.get("kept_share") is None:
        return Verdict(target, None, why or r.get("note") or "no adapter decision on this text")
    shown = f"{100 * r['kept_share']:.0f}% ({_kept(r)})"
    for other in (rows[k] for k in beside if rows.get(k, {}).get("kept_share") is not None):
        shown += f"; {PROSE_LABELS[other['key']]} {100 * other['kept_share']:.0f}% ({_kept(other)})"
    return Verdict(target, r["kept_share"], shown)


def verdicts(results: dict) -> list[Verdict]:
    return [
        decode_vs_builder(results),
        bandwidth_share(results),
        prompt_ratio(results, "smollm2", "onnx_opt_int4", "SmolLM2 shape int4"),
        prompt_ratio(results, "smollm2", "onnx_opt_int8", "SmolLM2 shape int8"),
        prompt_ratio(results, "gpt2", "onnx_opt_int8", "GPT-2-small shape int8"),
        file_ratio(results),
        export_ratio(results),
        wall(results),
        prose_top1_over_builder(results),
        prose_kept(results, "ours_int4", "int4", 0.7, beside=("ours_int4_keep", "builder_int4")),
        prose_top1(results, "ours_int8", "int8", 0.97),
        prose_kept(results, "ours_int8", "int8", 0.9),
        # the budgets of tests/real (test_minilm_int8/int4_embeddings), reasons given there
        minilm_cosine(results, "int8", 0.998),
        minilm_cosine(results, "int4", 0.94),
    ]


def host_line(results: dict) -> str:
    m = results["machine"]
    cache = f", last-level cache {m['cache']}" if m.get("cache") else ""
    return f"{m['cpu']}, {m['cores']} cores ({' '.join(m['isa'])}){cache}"


def markdown(results: dict) -> str:
    """The acceptance table, the host in its header."""
    race = _model(results, "smollm2").get("race") or {}
    spin = {True: "on", False: "off"}.get(race.get("spinning"), "—")
    lines = [
        f"Issue 25's acceptance, this run: {results['date']}, {host_line(results)}, "
        f"{results['threads']} threads. onnxruntime's thread spinning {spin}, the same on both sides, "
        f"in the race against the builder; off in the prompt passes (torch runs in turn there).",
        "",
        "| target | goal | measured (spread) | |",
        "|---|---:|---|---|",
    ]
    for v in verdicts(results):
        lines.append(f"| {v.target.what} | {v.target.goal} | {v.shown} | {v.word} |")
    busy = others(results)
    if busy is not None:
        loud = ": a busy machine, these figures are disturbed" if busy > 0.1 else ""
        lines += ["", f"Other processes used up to {100 * busy:.0f}% of the cores while it was timed{loud}."]
    return "\n".join(lines) + "\n"


def others(results: dict) -> float | None:
    """The largest share of the cores other processes took during any timed block of the run."""
    shares = [
        block["cpu_others"]["others"]
        for m in results.get("models", [])
        for block in (m, m.get("race") or {})
        if block.get("cpu_others")
    ]
    return max(shares, default=None)
