"""Issue 25's prose rows: the real SmolLM2-135M and its sample adapter, teacher-forced on English
prose (``samples/real/prose.txt``), each file run by onnxruntime-genai, against PEFT unmerged float32.

The text (six paragraphs written for this repository, 720 tokens), tokenized by SmolLM2's
tokenizer after its ``bos_token_id``, is fed whole; position i predicts token i + 1, so the
figures cover every token of the text. The reference is one forward
pass of PEFT eager unmerged in float32 (its top-1 at each position) and one of the same model with
the adapter disabled (the base's top-1): where the two differ the adapter made a decision.

The files: onnxruntime-genai's builder int4 with its defaults (the merged model, PEFT
``merge_and_unload``, saved as a Hugging Face folder: ``bench_builder``), and ours from
``loraexport merge-and-export --optimize`` with ``--quantize int4``, ``int4 --keep-adapter``,
``int8`` and ``int4 --block-size 64``, ``--no-verify`` (seconds each); with ``--verify`` (bench.py:
``--prose-verify``; about 4 minutes a file) verified, so that report.json has our held-out
``adapter_retained`` (computed on loraexport's own reference texts, not on this prose). Each file is run by
onnxruntime-genai: the tokens appended one at a time, the logits read after each (every graph
then computes the position it is given, the builder's and our last-position ``--optimize`` alike).

Figures per file, against PEFT float32: top-1 agreement over all positions; adapter decisions
kept, the positions where the adapter changes float32's top-1 and the file picks the adapter's
token (k of n, and the share); file bytes (``bench_builder.file_bytes``); ``adapter_retained``.
Exports are each their own process and kept in OUT (``bench.py``: runs/bench/exports/real/prose),
reused while their inputs are unchanged (loraexport's source for ours, onnxruntime-genai's
version for the builder's; ``--fresh`` re-exports).

    python benchmarks/bench_prose.py --real runs/real --out runs/bench/exports/real/prose
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_builder  # noqa: E402

PROSE = REPO / "samples" / "real" / "prose.txt"
MIN_POSITIONS = 300  # issue 25: "at least 300 positions"
# The files: key -> (label, merge-and-export options; None: the builder's int4).
FILES = {
    "builder_int4": ("onnxruntime-genai builder int4 (its defaults)", None),
    "ours_int4": ("loraexport int4 `--optimize`", ("--optimize", "--quantize", "int4")),
    "ours_int4_keep": (
        "loraexport int4 `--optimize --keep-adapter`",
        ("--optimize", "--quantize", "int4", "--keep-adapter"),
    ),
    "ours_int8": ("loraexport int8 `--optimize`", ("--optimize", "--quantize", "int8")),
    "ours_int4_b64": (
        "loraexport int4 `--optimize --block-size 64`",
        ("--optimize", "--quantize", "int4", "--block-size", "64"),
    ),
}
MERGE_AND_EXPORT_GATE_FAILED = 4  # its exit code when a parity gate fails: the files are written


@dataclass(frozen=True)
class Agreement:
    """One file's top-1 choices against the float32 references', over the same positions."""

    positions: int
    top1: float  # share of positions where the file's top-1 is PEFT float32's
    decisions: int  # positions where the adapter changes float32's top-1 (PEFT's ≠ the base's)
    kept: int  # of those, positions where the file's top-1 is PEFT float32's (the adapter's token)

    @property
    def kept_share(self) -> float | None:
        return self.kept / self.decisions if self.decisions else None


def agreement(peft_top1: np.ndarray, base_top1: np.ndarray, file_top1: np.ndarray) -> Agreement:
    """Top-1 agreement and adapter decisions kept, from three (positions,) arrays of token ids:
    PEFT unmerged float32's, the float32 base's (adapter disabled) and the file's."""
    if not peft_top1.shape == base_top1.shape == file_top1.shape or peft_top1.ndim != 1:
        shapes = (peft_top1.shape, base_top1.shape, file_top1.shape)
        raise ValueError(f"top-1 arrays must be one (positions,) shape; got peft, base, file = {shapes}")
    same = file_top1 == peft_top1
    decided = peft_top1 != base_top1
    return Agreement(
        positions=int(peft_top1.size),
        top1=float(same.mean()),
        decisions=int(decided.sum()),
        kept=int((same & decided).sum()),
    )


# ---- the text and the float32 references --------------------------------------------------------
def prose_ids(base: Path) -> np.ndarray:
    """``bos_token_id`` then the prose's tokens: (T,) int64."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    ids = tok.encode(PROSE.read_text(), add_special_tokens=False).ids
    bos = json.loads((base / "config.json").read_text())["bos_token_id"]
    if len(ids) < MIN_POSITIONS:
        raise ValueError(f"{PROSE} is {len(ids)} tokens; the rows need at least {MIN_POSITIONS}")
    return np.array([bos, *ids], dtype=np.int64)


def references(peft, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT float32's and the base's top-1 at positions 0 … T-2 (each predicting the next token)."""
    import torch

    x = torch.from_numpy(ids[None, :-1])  # (1, T-1)
    with torch.no_grad():
        adapted = peft(input_ids=x).logits[0].argmax(-1).numpy()  # (T-1,)
        with peft.disable_adapter():
            base = peft(input_ids=x).logits[0].argmax(-1).numpy()
    return adapted, base


# ---- the files -----------------------------------------------------------------------------------
def ours_export(base: Path, adapter: Path, out: Path, options: tuple[str, ...], verify: bool) -> float:
    """`loraexport merge-and-export OPTIONS`, its own process: verified (``--no-latency``; report.json
    then has our held-out adapter_retained, minutes per file) or ``--no-verify`` (seconds)."""
    cmd = [sys.executable, "-m", "loraexport.cli", "merge-and-export", "--base", str(base)]
    checks = ("--no-latency",) if verify else ("--no-verify",)
    cmd += ["--adapter", str(adapter), "--out", str(out), *options, *checks, "--force"]
    return bench_builder.run_timed(cmd, out.parent / f"{out.name}.log", ok=(0, MERGE_AND_EXPORT_GATE_FAILED))


def builder_from_peft(peft, hf_dir: Path, out: Path) -> float:
    """The builder's int4 of PEFT's ``merge_and_unload`` (``peft`` is merged in place: its references
    come first); the seconds of the export alone. The Hugging Face folder is removed once read."""
    try:
        bench_builder.save_merged(peft.merge_and_unload(), hf_dir)
        return bench_builder.builder_export(hf_dir, out, "int4")
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)


def retained(out: Path) -> tuple[float | None, float | None]:
    """Our report's held-out (adapter_retained, top1_agreement) of its quantized file, when verify ran."""
    report = out / "report.json"
    if not report.is_file():
        return None, None
    rows = json.loads(report.read_text()).get("quantization") or []
    if not rows:
        return None, None
    return rows[0].get("adapter_retained"), rows[0].get("top1_agreement")


def teacher_forced(directory: Path, ids: np.ndarray, threads: int) -> np.ndarray:
    """onnxruntime-genai on ``directory``, ``ids[:-1]`` appended one token at a time: the top-1 after
    each, (T-1,)."""
    import onnxruntime_genai as og

    model = bench_builder.genai_model(directory, threads, spinning=False)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=int(ids.size))
    gen = og.Generator(model, params)
    top = np.empty(ids.size - 1, dtype=np.int64)
    for i, t in enumerate(ids[:-1]):
        gen.append_tokens(np.array([[t]], dtype=np.int32))
        logits = np.asarray(gen.get_logits())  # (1, 1, vocab) or (1, vocab): this token's
        top[i] = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
    return top


def measure(
    base: Path, adapter: Path, out: Path, threads: int, digest: str, fresh: bool, log, verify: bool = False
) -> dict:
    """The four files' rows (see the module's text); a file whose export failed has a ``note``."""
    from bench_models import load_torch

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ids = prose_ids(base)
    with warnings.catch_warnings():  # transformers' deprecation notes, not ours to act on
        warnings.simplefilter("ignore")
        peft = load_torch(base, adapter, merged=False)
    peft_top1, base_top1 = references(peft, ids)
    inputs = {"base": bench_builder.tree_stamp(base), "adapter": bench_builder.tree_stamp(adapter)}
    rows = []
    for key, (label, options) in FILES.items():
        d = out / key
        row: dict = {"key": key, "label": label, "note": ""}
        if options is None:
            make = lambda d=d: builder_from_peft(peft, out / "merged", d)  # noqa: E731
            cache_key = inputs | {"genai": bench_builder.genai_version(), "p": "int4"}
        else:
            make = lambda d=d, options=options: ours_export(base, adapter, d, options, verify)  # noqa: E731
            cache_key = inputs | {"source": digest, "options": list(options), "verify": verify}
        try:
            seconds, reused = bench_builder.cached(d, cache_key, make, fresh)
        except (bench_builder.BuildFailed, OSError) as e:
            row["note"] = f"export failed: {e}"
            log(f"  prose: {key}: {row['note']}")
            rows.append(row)
            continue
        made = "reused" if reused else "exported"
        log(f"  prose: {key} {made} ({seconds:.1f} s when made); teacher-forcing {ids.size - 1} positions …")
        top1 = teacher_forced(d, ids, threads)
        a = agreement(peft_top1, base_top1, top1)
        row |= asdict(a) | {"kept_share": a.kept_share, "file_bytes": bench_builder.file_bytes(d)}
        row |= {"export_s": seconds, "reused": reused}
        row["adapter_retained"], row["report_top1"] = retained(d) if options else (None, None)
        rows.append(row)
    return {
        "text": str(PROSE.relative_to(REPO)),
        "positions": int(peft_top1.size),
        "decisions": int((peft_top1 != base_top1).sum()),
        "threads": threads,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }


def step(
    base: Path, adapter: Path, out: Path, threads: int, digest: str, fresh: bool, log, verify: bool = False
) -> dict:
    """``make bench``'s prose step for the real model: ``{"prose": …}``, or ``{"prose_note": why}``
    when it failed (the rest of the table stands)."""
    log("  prose: teacher-forcing the real SmolLM2's files on samples/real/prose.txt …")
    try:
        prose = measure(base, adapter, out, threads, digest, fresh, log, verify)
    except Exception as e:  # the prose rows' failure leaves the table standing
        note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log(f"  prose {note}")
        return {"prose_note": note}
    log(f"  prose: {prose['wall_s']:.0f} s")
    return {"prose": prose}


def markdown(results: dict) -> str:
    """The prose table of every model that has one (``bench.json``'s ``prose``), the builder first."""
    out = []
    for m in results.get("models", []):
        prose = m.get("prose")
        if not prose:
            if m.get("prose_note"):
                out += [f"**{m['label']}, teacher-forced prose:** {m['prose_note']}", ""]
            continue
        out += [
            f"**{m['label']}, teacher-forced on English prose** ({prose['text']}, {prose['positions']} "
            f"positions; the adapter changes float32's top-1 at {prose['decisions']}), each file run by "
            "onnxruntime-genai, against PEFT unmerged float32.",
            "",
            "| file | top-1 | adapter decisions kept | file MB | our report: adapter_retained (top-1) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in prose["rows"]:
            if r["note"]:
                out.append(f"| {r['label']} | {r['note']} | | | |")
                continue
            kept = f"{r['kept']}/{r['decisions']}"
            if r["kept_share"] is not None:
                kept += f" ({100 * r['kept_share']:.0f}%)"
            ret = "—" if r["key"] == "builder_int4" else "not verified"  # the builder writes no report
            if r.get("adapter_retained") is not None:
                ret = f"{100 * r['adapter_retained']:.1f}%"
            if r.get("report_top1") is not None:
                ret += f" ({100 * r['report_top1']:.1f}%)"
            out.append(
                f"| {r['label']} | {100 * r['top1']:.1f}% | {kept} | {r['file_bytes'] / 1e6:.0f} | {ret} |"
            )
        out += [
            "",
            "Adapter decisions kept: the positions where the adapter changes PEFT float32's top-1 "
            "(against the base's) and the file keeps the adapter's token. Our report: report.json's "
            "adapter_retained and top-1 from `merge-and-export`'s verify, held out (loraexport's own "
            "reference texts, not this prose; none for the builder's file). "
            f"{prose['wall_s']:.0f} s for this table.",
            "",
        ]
    return "\n".join(out)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=Path("runs/real"), help="prepare.py's folder")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/exports/real/prose"), help="exports here")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--fresh", action="store_true", help="re-export even when a matching export exists")
    ap.add_argument("--verify", action="store_true", help="verify our exports (adapter_retained; minutes)")
    args = ap.parse_args()
    import bench  # its source digest keys our exports, as make bench's
    import torch

    torch.set_num_threads(args.threads)
    base, adapter = args.real / "smollm2", args.real / "smollm2-adapter"
    digest = bench.source_digest()
    prose = measure(base, adapter, args.out, args.threads, digest, args.fresh, bench.log, args.verify)
    model = {"label": "SmolLM2-135M (real weights and adapter)", "prose": prose}
    (args.out / "prose.json").write_text(json.dumps(prose, indent=1) + "\n")
    print(markdown({"models": [model]}))


if __name__ == "__main__":
    main()
