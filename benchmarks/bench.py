"""`make bench`: loraexport's exports against what users run today, one table.

For a GPT-2-small-shaped model (12 × 768, vocab 50257, LoRA r=8 on c_attn), a SmolLM2-135M-shaped
Llama (30 layers, 576 wide, 9/3 heads, vocab 49152, tied embeddings, LoRA r=8 on q_proj,v_proj),
both with random weights, and the real SmolLM2-135M when runs/real/smollm2 exists, it times

  PEFT eager unmerged · PyTorch merged (merge_and_unload) · loraexport's ONNX export, float32
  · --optimize · --quantize int8 · --quantize int4 · int4 keeping the adapter in float32
  · onnxruntime-genai running the float32 export

(options the library does not have yet are rows marked "not available"; nothing is quantized
by other means) at prompt passes b1×128, b4×128, b1×512 (full logits on every side) and greedy
decoding (128-token prompt, 64 new tokens, batch 1, end to end), all variants interleaved in
one process with fixed threads and no onnxruntime spinning, medians with IQR, ratios against
PEFT eager, and efficiency against a GEMM peak and read bandwidth measured in the same run.
On the SmolLM2 shape it then races onnxruntime-genai's model builder (bench_builder.py: export
time, file bytes, decode with the same thread spinning on both sides); on the real SmolLM2 it runs
the builder's int4 and our int4 and int8 files in onnxruntime-genai, teacher-forced on English prose
(bench_prose.py: top-1 and the adapter's decisions kept, against PEFT float32); and it ends with
issue 25's acceptance table (bench_acceptance.py), the host named, "holds" beside each target.

Writes OUT/bench.md, bench.json, bench.png (OUT: runs/bench; exports in OUT/exports, reused
while loraexport's source, the inputs and the options are unchanged; --fresh re-exports).
About 10-13 minutes on 2 cores; run it on a quiet machine: a neighbour busy on one core slows
torch's OpenMP threads many times over (the output says how much CPU others took meanwhile).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import filecmp
import gc
import hashlib
import io
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar too
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench_acceptance  # noqa: E402
import bench_builder  # noqa: E402
import bench_ceilings  # noqa: E402
import bench_minilm  # noqa: E402
import bench_models  # noqa: E402
import bench_prose  # noqa: E402
import bench_table  # noqa: E402
import numpy as np  # noqa: E402
from bench_table import POINTS, point_key  # noqa: E402

PROMPT, NEW_TOKENS = 128, 64
# Export rows: key, label, keyword arguments of loraexport.stages.export.export.
EXPORTS = (
    ("onnx_fp32", "ONNX float32 (loraexport export)", {}),
    ("onnx_opt", "ONNX float32 --optimize", {"optimize": True}),
    ("onnx_opt_int8", "ONNX --optimize --quantize int8", {"optimize": True, "quantize": "int8"}),
    (
        "onnx_opt_int8d",
        "ONNX --optimize --quantize int8-dynamic",
        {"optimize": True, "quantize": "int8-dynamic"},
    ),
    ("onnx_opt_int4", "ONNX --optimize --quantize int4", {"optimize": True, "quantize": "int4"}),
    (
        "onnx_opt_int4_keep",
        "ONNX --optimize --quantize int4 --keep-adapter",
        {"optimize": True, "quantize": "int4", "keep_adapter": True},
    ),
)
GENAI_EXPORT = "onnx_opt"  # the export onnxruntime-genai runs (its shared key/value buffer)
RACE_SHAPES = ("smollm2",)  # the shapes raced against onnxruntime-genai's builder (bench_builder)
REAL_POINTS = POINTS[:1]  # the real SmolLM2's prompt points: its speed elsewhere is the SmolLM2 shape's
# A prompt point stops at twice its budget once it has this many rounds (--rounds when the budget
# allows): make bench stays within its 15 minutes when a neighbour slows every round.
FLOOR_ROUNDS = 3
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def hushed():
    """transformers/PEFT/torch.onnx warnings off stderr while they load or export."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class CpuMeter:
    """CPU time other processes took while we measured (/proc/stat is the whole machine's, other
    containers included; ours comes from os.times): a busy neighbour ruins torch's OpenMP
    timings far more than onnxruntime's, so a run says how quiet it was."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        busy = steal = 0.0
        with contextlib.suppress(OSError, ValueError), open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
            busy, steal = (sum(v[:8]) - v[3] - v[4]) / tick, (v[7] if len(v) > 7 else 0) / tick
        t = os.times()
        return time.perf_counter(), busy, steal, t.user + t.system

    def others(self) -> dict[str, float]:
        """Share of all cores' time used by other processes (and stolen by the hypervisor)."""
        w0, b0, s0, o0 = self.start
        w1, b1, s1, o1 = self._read()
        cap = max((w1 - w0) * len(os.sched_getaffinity(0)), 1e-9)
        return {"others": max(0.0, (b1 - b0) - (o1 - o0)) / cap, "steal": (s1 - s0) / cap}


@dataclass
class Row:
    key: str
    label: str
    prompt: object = None  # (ids, mask) -> logits
    decode: object = None  # (ids, mask, n) -> new ids (n,)
    weight_bytes: int | None = None
    note: str = ""
    detail: str = ""
    export_s: float | None = None

    @property
    def available(self) -> bool:
        return self.prompt is not None or self.decode is not None


# ---- exports -----------------------------------------------------------------------------------
def source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((REPO / "loraexport").rglob("*.py")):
        h.update(p.relative_to(REPO).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def tree_stamp(d: Path) -> list:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir() if p.is_file())


def export_rows(base: Path, adapter: Path, out: Path, fresh: bool, digest: str) -> dict[str, Row]:
    from loraexport.spec import RUN_FIELDS, SPEC_FIELDS
    from loraexport.stages.export import export

    known = set(SPEC_FIELDS) | set(RUN_FIELDS)  # export() takes the options as keywords (**fields)
    rows = {}
    for key, label, kwargs in EXPORTS:
        row = Row(key, label)
        rows[key] = row
        missing = [k for k in kwargs if k not in known]
        if missing:
            row.note = f"not available (export() has no `{'`, `'.join(missing)}` yet)"
            continue
        d, stamp = out / key, out / f"{key}.key.json"
        want = {"source": digest, "kwargs": kwargs, "base": tree_stamp(base), "adapter": tree_stamp(adapter)}
        want = json.loads(json.dumps(want))
        if not fresh and stamp.is_file() and (d / "loraexport.json").is_file():
            have = json.loads(stamp.read_text())
            if have.get("key") == want:
                row.export_s = have["seconds"]
                log(f"  {key}: reusing {d} (exported in {row.export_s:.1f} s)")
                continue
        log(f"  {key}: exporting {kwargs or 'float32'} …")
        t0 = time.perf_counter()
        try:
            with hushed():
                export(base, d, adapter=adapter, force=True, **kwargs)
        except Exception as e:  # an option the library refuses: the row says so, the bench goes on
            row.note = f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            log(f"  {key}: {row.note}")
            continue
        row.export_s = time.perf_counter() - t0
        stamp.write_text(json.dumps({"key": want, "seconds": row.export_s}))
        log(f"  {key}: {row.export_s:.1f} s")
    return rows


def same_graph(a: Path, b: Path) -> bool:
    """Two exports whose graphs and weights are the same bytes (model.onnx and its data)."""
    names = ("model.onnx", "model.onnx.data")
    if any((a / n).is_file() != (b / n).is_file() for n in names):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names if (a / n).is_file())


def mark_duplicate(rows: dict[str, Row], root: Path) -> None:
    """A Llama-family decoder's plain export is --optimize's fused graph, byte for byte: timed
    once, in the --optimize row; the plain row says so."""
    plain, opt = rows.get("onnx_fp32"), rows.get("onnx_opt")
    if not plain or not opt or plain.note or opt.note:
        return
    if same_graph(root / plain.key, root / opt.key):
        plain.note = "the same files as `--optimize` (this model's default export): timed once, in that row"


# ---- runners -----------------------------------------------------------------------------------
def torch_runners(model, last_position: bool = False):
    """(prompt, decode); ``last_position``: the prompt pass computes the last position's logits
    only (transformers' ``logits_to_keep=1``, what ``generate`` does), as --optimize's graphs do."""
    import torch

    keep = {"logits_to_keep": 1} if last_position else {}

    @torch.no_grad()
    def prompt(ids, mask):
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **keep).logits

    @torch.no_grad()
    def decode(ids, mask, n):
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=n,
            min_new_tokens=n,  # every variant decodes all n tokens, past an end token too
            do_sample=False,
        )
        return out[0, ids.shape[1] :].numpy()

    return prompt, decode


def onnx_runners(directory: Path, threads: int):
    from loraexport.runtime.model import OnnxModel

    om = OnnxModel(directory, threads=threads, spinning=False)  # as genai_runner: the same setting
    return (lambda ids, mask: om.forward(ids, mask)), (lambda ids, mask, n: om.generate(ids, mask, n)[0])


def genai_runner(directory: Path, threads: int):
    """onnxruntime-genai on loraexport's float32 export, as written, with our threads and no
    spinning overlaid on its session options (the files are not touched)."""
    return bench_builder.genai_decode(directory, threads, spinning=False)


def compare_logits(outs: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each variant's prompt logits against PEFT eager's at the same positions (all of them, or
    the last one for a last-position graph): top-1 agreement and the largest absolute difference."""
    full = outs["peft"]
    out = {}
    for k, o in outs.items():
        if k == "peft":
            continue
        ref = full[:, -o.shape[1] :] if o.shape[1] == 1 else full
        if o.shape != ref.shape:
            continue
        out[k] = {
            "top1": float((o.argmax(-1) == ref.argmax(-1)).mean()),
            "max_abs": float(np.abs(o - ref).max()),
            "positions": int(o.shape[0] * o.shape[1]),
        }
    return out


# ---- one model ---------------------------------------------------------------------------------
def run_model(shape, args, digest: str) -> dict:

    from loraexport.verify.latency import time_interleaved

    result: dict = {"key": shape.key, "label": shape.label}
    log(f"{shape.label}: building / locating …")
    with hushed():
        found = bench_models.locate(shape, args.out / "models", args.real)
    if isinstance(found, str):
        result["skipped"] = found
        log(f"  skipped: {found}")
        return result
    base, adapter = found
    rows = export_rows(base, adapter, args.out / "exports" / shape.key, args.fresh, digest)
    mark_duplicate(rows, args.out / "exports" / shape.key)
    log("  loading PEFT eager and merged …")
    with hushed():
        peft = bench_models.load_torch(base, adapter, merged=False)
        merged = bench_models.load_torch(base, adapter, merged=True)
    peers = merge_s = None
    if args.race and shape.key in RACE_SHAPES:
        opt = rows.get("onnx_opt")
        ours_fp32 = args.out / "exports" / shape.key / opt.key if opt and not opt.note else None
        root = args.out / "exports" / shape.key / "race"
        try:
            peers, merge_s = bench_builder.make_peers(merged, base, adapter, ours_fp32, root, args.fresh, log)
        except Exception as e:  # the race's failure leaves the table standing
            result["race_note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"  race {result['race_note']}")
    work = bench_models.work_of(merged)
    lora_bytes = sum(p.numel() * 4 for n, p in peft.named_parameters() if "lora_" in n)
    ordered = [
        Row("peft", "PEFT eager unmerged", *torch_runners(peft), work.weight_bytes_fp32 + lora_bytes),
        Row(
            "peft_last",
            "PEFT eager unmerged, last-position logits",
            torch_runners(peft, last_position=True)[0],
            weight_bytes=work.weight_bytes_fp32 + lora_bytes,
            detail="prompt only; the reference for rows that compute the last position's logits",
        ),
        Row("merged", "PyTorch merged", *torch_runners(merged), work.weight_bytes_fp32),
    ]
    for key, row in rows.items():
        ordered.append(row)
        if row.note:
            continue
        d = args.out / "exports" / shape.key / key
        row.prompt, row.decode = onnx_runners(d, args.threads)
        row.weight_bytes = bench_models.onnx_weight_bytes(d / "model.onnx")
    src = rows[GENAI_EXPORT]
    genai = Row(
        "genai", f"onnxruntime-genai ({src.label.removeprefix('ONNX ')})", weight_bytes=src.weight_bytes
    )
    if src.note:
        genai.note = f"not available (no {GENAI_EXPORT} export)"
    else:
        try:
            genai.decode = genai_runner(args.out / "exports" / shape.key / GENAI_EXPORT, args.threads)
            genai.detail = "decode only (its prompt pass runs the same graph as that row)"
        except Exception as e:
            genai.note = f"not available: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    ordered.append(genai)
    live = [r for r in ordered if r.available]
    meter = CpuMeter()
    result["work"] = {
        "params": sum(p.numel() for p in merged.parameters()),
        "weight_bytes_fp32": work.weight_bytes_fp32,
        "gflop_b1x128": work.prompt_flops(1, PROMPT) / 1e9,
        **work.__dict__,
    }
    rng = np.random.default_rng(0)
    vocab = work.vocab
    prompt_stats: dict[str, dict] = {r.key: {} for r in live}
    agreement: dict[str, dict] = {}
    points = REAL_POINTS if shape.real else POINTS
    if points != POINTS:
        result["points_note"] = (
            "only the b1×128 prompt pass is timed: this model has the SmolLM2 shape's work, so its speed "
            "at the other points is that shape's (its rows here are for agreement on real weights)"
        )
    for b, s in POINTS:
        ids = rng.integers(3, vocab, size=(b, s), dtype=np.int64)  # drawn for every point: same decode prompt
        if (b, s) not in points:
            continue
        mask = np.ones_like(ids)
        variants = {r.key: (lambda r=r, ids=ids, mask=mask: r.prompt(ids, mask)) for r in live if r.prompt}
        first = {k: np.asarray(fn()) for k, fn in variants.items()}  # also a first warm call
        positions = {k: out.shape[1] for k, out in first.items()}
        agreement[point_key(b, s)] = compare_logits(first)
        del first
        for r in live:
            if r.key in positions and positions[r.key] != s and not r.detail:
                r.detail = f"computes logits for {positions[r.key]} position(s) only; FLOPs counted so"
        log(f"  prompt b{b}×{s}: {len(variants)} variants interleaved …")
        budget = args.budget * (1 if (b, s) == (1, 128) else 2.5)
        stats = time_interleaved(
            variants, warmup=2, min_runs=args.rounds, floor_runs=FLOOR_ROUNDS, max_runs=500, budget_s=budget
        )
        for k, st in stats.items():
            flops = work.prompt_flops(b, s, positions[k])
            # against PEFT computing the same positions' logits (all, or the last one)
            ref = "peft_last" if positions[k] == 1 and k != "peft_last" and "peft_last" in stats else "peft"
            prompt_stats[k][point_key(b, s)] = {
                "p50_ms": st.p50_ms,
                "iqr_ms": st.iqr_ms,
                "p90_ms": st.p90_ms,
                "runs": st.runs,
                "ratio": stats[ref].p50_ms / st.p50_ms,
                "against": ref,
                "logit_positions": positions[k],
                "gflop": flops / 1e9,
                "eff": None,  # against the peak, once both ceilings are measured (apply_ceilings)
            }
        del variants
    ids = rng.integers(3, vocab, size=(1, PROMPT), dtype=np.int64)
    mask = np.ones_like(ids)
    tokens = {r.key: np.asarray(r.decode(ids, mask, NEW_TOKENS)) for r in live if r.decode}  # + warm-up
    variants = {r.key: (lambda r=r: r.decode(ids, mask, NEW_TOKENS)) for r in live if r.decode}
    log(f"  decode {PROMPT}+{NEW_TOKENS}: {len(variants)} variants interleaved …")
    stats = time_interleaved(
        variants,
        warmup=0,
        min_runs=max(2, args.rounds // 2),
        floor_runs=max(2, args.rounds // 2),
        max_runs=100,
        budget_s=args.budget * 3,
    )
    peft_tps = NEW_TOKENS / (stats["peft"].p50_ms / 1e3)
    out_rows = []
    for r in ordered:
        entry = {"key": r.key, "label": r.label, "available": r.available, "note": r.note, "detail": r.detail}
        entry["export_s"] = r.export_s
        entry["weight_bytes_per_token"] = r.weight_bytes
        if r.available:
            entry["prompt"] = prompt_stats.get(r.key, {})
            if r.key in stats:
                st = stats[r.key]
                tps = NEW_TOKENS / (st.p50_ms / 1e3)
                differs = np.flatnonzero(tokens[r.key][:NEW_TOKENS] != tokens["peft"][:NEW_TOKENS])
                same = int(differs[0]) if differs.size else NEW_TOKENS
                entry["decode"] = {
                    "tok_s": tps,
                    "p50_ms": st.p50_ms,
                    "iqr_rel": st.iqr_ms / st.p50_ms,
                    "runs": st.runs,
                    "ratio": tps / peft_tps,
                    "bw_eff": None,
                    "same_prefix_as_peft": same,
                }
        out_rows.append(entry)
    for entry in out_rows:
        entry["vs_peft"] = {p: a[entry["key"]] for p, a in agreement.items() if entry["key"] in a}
    result["rows"] = out_rows
    result["cpu_others"] = meter.others()
    del ordered, live, variants, rows, peft, merged
    gc.collect()
    if shape.real:
        prose_out = args.out / "exports" / shape.key / "prose"
        result |= bench_prose.step(
            base, adapter, prose_out, args.threads, digest, args.fresh, log, args.prose_verify
        )
    if peers:
        race_meter = CpuMeter()
        result["race"] = bench_builder.race(peers, ids, NEW_TOKENS, tokens.get("peft"), args, log)
        result["race"] |= {"merge_s": merge_s, "cpu_others": race_meter.others()}
    gc.collect()
    return result


def apply_ceilings(start: dict, end: dict, models: list[dict]) -> None:
    """The ceilings are measured before and after the models; each is the higher of the two (the
    clock and the neighbours move a few % to 20% between blocks). Efficiencies use it."""
    for k in ("gemm_gflops", "read_gbps", "copy_gbps", "torch_gemm_gflops"):
        start[k + "_start"], start[k + "_end"] = start[k], end[k]
        start[k] = max(start[k], end[k])
    for m in models:
        for r in m.get("rows", []):
            for p in (r.get("prompt") or {}).values():
                p["eff"] = p["gflop"] / (p["p50_ms"] / 1e3) / start["gemm_gflops"]
            d = r.get("decode")
            if d:
                d["bw_eff"] = (r["weight_bytes_per_token"] or 0) * d["tok_s"] / (start["read_gbps"] * 1e9)
        for r in (m.get("race") or {}).get("rows", []):
            d = r.get("decode")
            if d:
                d["bw_eff"] = r["weight_bytes_per_token"] * d["tok_s"] / (start["read_gbps"] * 1e9)


def wait_quiet(limit_s: float) -> None:
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        meter = CpuMeter()
        time.sleep(10)
        others = meter.others()["others"]
        if others < 0.1:
            log(f"machine quiet (others {100 * others:.0f}%)")
            return
        log(f"waiting for a quiet machine: others used {100 * others:.0f}% of the cores")
    if limit_s:
        log("the machine did not become quiet; measuring anyway")


def machine() -> dict:
    cpu, cache = platform.processor(), None
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("cache size"):  # the last level, as the (virtual) machine reports it
                cache = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "isa": isa, "cache": cache}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-genai", "loraexport")
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def run_minilm(args, wanted: list[str]) -> dict:
    """The real MiniLM (never quantized): int8 and int4 sentence embeddings against PEFT float32
    (``bench_minilm``); a dict with ``note`` when left out or failed."""
    adapter = args.real / "minilm-adapter"
    if args.quick or "real" not in wanted or not adapter.is_dir():
        return {"note": "left out (--quick, no real model asked for, or no runs/real/minilm-adapter)"}
    log("MiniLM (real, never quantized): float32, int8, int4 sentence embeddings …")
    try:
        return bench_minilm.measure(
            bench_minilm.minilm_dir(), adapter, args.out / "exports" / "minilm", log=lambda m: log(f"  {m}"),
            variants=("float32", "int8", "int4"),
        )  # fmt: skip
    except Exception as e:  # its failure leaves the rest of the table standing
        log(f"  MiniLM failed: {type(e).__name__}: {e}")
        return {"note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--models",
        default="gpt2,smollm2,real",
        help="comma list of gpt2, smollm2, real (all three; real is skipped with a note when absent)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, short budgets: a smoke run (~1 min)")
    ap.add_argument("--threads", type=int, default=cores, help=f"torch and onnxruntime threads ({cores})")
    ap.add_argument("--out", type=Path, help="output folder (runs/bench; --quick: runs/bench-quick)")
    ap.add_argument("--real", type=Path, default=bench_models.REAL_DIR, help="prepare.py's folder")
    ap.add_argument("--budget", type=float, help="seconds per b1×128 point; others ×2.5, decode ×3 (8)")
    ap.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds per prompt point, budget allowing (6; at least 3); decode half",
    )
    ap.add_argument("--fresh", action="store_true", help="re-export even when a matching export exists")
    ap.add_argument(
        "--prose-verify",
        action="store_true",
        help="verify the prose rows' exports too (our adapter_retained beside them; ~4 min a file)",
    )
    ap.add_argument(
        "--no-race",
        dest="race",
        action="store_false",
        help="leave out the race against onnxruntime-genai's model builder (bench_builder.py)",
    )
    ap.add_argument(
        "--race-spinning",
        choices=("on", "off"),
        default="on",
        help="onnxruntime's thread spinning in the race, both sides (on: an app's setting)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for 10 s in which other processes use under 10%% of the cores",
    )
    args = ap.parse_args()
    args.out = args.out or Path("runs/bench-quick" if args.quick else "runs/bench")
    args.budget = args.budget if args.budget is not None else (0.5 if args.quick else 8.0)
    args.rounds = args.rounds or (4 if args.quick else 6)
    args.race_spinning = args.race_spinning == "on"
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    all_shapes = bench_models.shapes(args.quick)
    unknown = [m for m in wanted if m not in all_shapes]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(all_shapes)}")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    wait_quiet(args.wait_quiet)
    load_start = os.getloadavg()
    log(f"ceilings ({args.threads} threads) …")
    ceilings = bench_ceilings.measure(args.threads, args.quick)
    args.ceilings = ceilings
    log(
        f"  GEMM {ceilings['gemm_gflops']:.0f} GFLOP/s (torch.mm {ceilings['torch_gemm_gflops']:.0f}), "
        f"read {ceilings['read_gbps']:.1f} GB/s, "
        f"copy {ceilings['copy_gbps']:.1f} GB/s"
    )
    digest = source_digest()
    models = []
    for key in wanted:
        shape = all_shapes[key]
        if args.quick and shape.real:
            models.append({"key": key, "label": shape.label, "skipped": "--quick leaves the real model out"})
            continue
        try:
            models.append(run_model(shape, args, digest))
        except Exception as e:  # one model's failure leaves the others' figures standing
            log(f"  {shape.label} failed: {type(e).__name__}: {e}")
            reason = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            models.append({"key": key, "label": shape.label, "skipped": reason})
        gc.collect()
    minilm = run_minilm(args, wanted)
    log("ceilings again …")
    after = bench_ceilings.measure(args.threads, args.quick)
    apply_ceilings(ceilings, after, models)
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "threads": args.threads,
        "versions": versions(),
        "ceilings": ceilings,
        "decode": {"prompt": PROMPT, "new_tokens": NEW_TOKENS, "batch": 1},
        "quick": args.quick,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "models": models,
        "minilm": minilm,
        "wall_s": time.perf_counter() - T0,
    }
    results["acceptance"] = [v.as_dict() for v in bench_acceptance.verdicts(results)]
    md = bench_table.markdown(results)
    md += "\n" + bench_table.race_markdown(results)
    md += "\n" + bench_prose.markdown(results)
    md += "\n" + bench_acceptance.markdown(results)
    md += (
        f"\n{results['date']}, {bench_acceptance.host_line(results)}, "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v)
        + f"; wall {results['wall_s']:.0f} s; load average {load_start[0]:.1f} → {os.getloadavg()[0]:.1f}.\n"
    )
    print(md)
    (args.out / "bench.md").write_text(md)
    bench_table.write_json(results, args.out / "bench.json")
    bench_table.chart(results, args.out / "bench.png")
    log(f"wrote {args.out}/bench.md, bench.json, bench.png")


if __name__ == "__main__":
    main()
