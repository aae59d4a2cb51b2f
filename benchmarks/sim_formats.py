"""Candidate quantized formats, simulated in torch on the real SmolLM2-135M and its sample adapter,
teacher-forced on ``samples/real/prose.txt`` with the figures of ``bench_prose`` (top-1 agreement
and adapter decisions kept, against PEFT unmerged float32): which format could meet issue 25's
accuracy rows before anyone writes its graph, and which was refused for what.

Each variant replaces every projection's weight (the 30 layers' and the tied LM head's, so the
embedding too) by its dequantized value, and rounds the projections' inputs as the kernel would:

- symmetric formats use the quantizer our exports use (``export.qformat.nbits_quantize``,
  onnxruntime's own: the weights are bit for bit the file's);
- accuracy level 4's activations: int8 per block of the weight's block size, symmetric
  (amax / 127), as MLAS quantizes them;
- W8A8 (``MatMulInteger``): weights int8 per output channel, activations int8 per token (one
  scale a row) or per tensor (``quantize_dynamic``);
- asymmetric int4: a scale and an offset per block, the offset a float (what HQQ and GGUF's Q4_1
  store) or an integer (``MatMulNBits``' uint8 zero points);
- ``searched``: the symmetric grid with each block's scale chosen for the least squared error
  (clipping), a rounding that needs no calibration data;
- ``keep``: the base's projections quantized, the adapter's update added in float32
  (``--keep-adapter``).

Two rows are formats we ship (int8; int4: 4-bit blocks of 16, the MLP down projections and the head
8-bit) and calibrate the simulation against ``bench_prose``'s measured files. Rounding is all that
is simulated: onnxruntime's kernels add their own float32 error, so a row within a point of a goal
decides nothing. ``benchmarks/bench_kernels.py`` says what each format's kernel costs.

    python benchmarks/sim_formats.py --real runs/real [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar too
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_prose  # noqa: E402

from loraexport.export.qformat import NBits, nbits_dequantize, nbits_quantize  # noqa: E402


# ---- rounding, on torch tensors (weights (N, K) as nn.Linear holds them) ---------------------------
def sym(w, bits: int, block: int):
    """Our exports' symmetric blocks: onnxruntime's quantizer, dequantized as the kernel reads it."""
    import torch

    n, k = w.shape
    packed, scales = nbits_quantize(w.T.contiguous().numpy(), bits, block)
    return torch.from_numpy(nbits_dequantize(packed, scales, NBits(k, n, bits, block)).T.copy())


# the clipping ratios ``searched`` tries: the block's largest magnitude, down to 60% of it
CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(21))


def searched(w, bits: int, block: int):
    """Symmetric blocks on our exports' grid (codes −2^(bits−1)…2^(bits−1)−1, the largest
    magnitude on −2^(bits−1): onnxruntime's convention), each block's scale the one of
    ``CLIP_RATIOS`` × the absmax scale with the least squared error (clipping a few large weights
    to round the rest finer): what a better rounding without calibration data could give."""
    import torch

    n, k = w.shape
    wb = w.double().reshape(n, k // block, block)  # (N, blocks, block)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    peak = torch.gather(wb, -1, wb.abs().argmax(-1, keepdim=True))  # signed, (N, blocks, 1)
    best, best_err = None, None
    for ratio in CLIP_RATIOS:
        scale = peak / lo * ratio
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        got = (wb / scale).round().clamp(lo, hi) * scale
        err = ((got - wb) ** 2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = got, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, got, best), torch.where(better, err, best_err)
    return best.reshape(n, k).float()


def per_channel8(w):
    """int8 per output channel, symmetric (quantize_dynamic's weights)."""
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    return (w / scale).round().clamp(-127, 127) * scale


def asym(w, block: int, float_offset: bool):
    """int4 with a scale and an offset per block of ``block`` along K: min-max, the offset a float
    or rounded to an integer code (a uint8 zero point)."""
    n, k = w.shape
    wb = w.reshape(n, k // block, block)
    lo, hi = wb.amin(-1, keepdim=True), wb.amax(-1, keepdim=True)
    if not float_offset:  # an integer zero point must sit in [0, 15]: zero inside the range
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = -lo / scale if float_offset else (-lo / scale).round().clamp(0, 15)
    q = (wb / scale + zero).round().clamp(0, 15)
    return ((q - zero) * scale).reshape(n, k)


def act_blocks(x, block: int):
    """Accuracy level 4: int8 per block of ``block`` along the last axis."""
    shape = x.shape
    xb = x.reshape(*shape[:-1], shape[-1] // block, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    scale = scale.masked_fill(scale == 0, 1.0)
    return ((xb / scale).round().clamp(-127, 127) * scale).reshape(shape)


def act_token(x):
    scale = x.abs().amax(-1, keepdim=True) / 127
    scale = scale.masked_fill(scale == 0, 1.0)
    return (x / scale).round().clamp(-127, 127) * scale


def act_tensor(x):
    """DynamicQuantizeLinear: uint8, one scale and zero point for the tensor (zero in range)."""
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = (-lo / scale).round()
    return ((x / scale + zero).round().clamp(0, 255) - zero) * scale


# ---- the variants ----------------------------------------------------------------------------------
Weight = Callable[[str, object], object]  # (module name, weight) -> the weight computed with
Act = Callable[[str, object], object] | None  # (module name, input) -> the input computed with


def wide(n: str, k: int) -> bool:
    """What our int4 keeps in 8 bits (``export.quantize.EIGHT_BIT``): the projections whose K is
    wider than the model (the MLP's down / output projections) and the LM head."""
    return n == "lm_head" or k > HIDDEN[0]


HIDDEN = [0]  # the model's width, set by ``measure``


def _ours_int4(n: str, w):
    return sym(w, 8, 16) if wide(n, w.shape[1]) else sym(w, 4, 16)


def _by_role(n: str, k: int, eight: int, four: int) -> int:
    return eight if wide(n, k) else four


def _asym_or_8(float_offset: bool):
    return lambda n, w: sym(w, 8, 16) if wide(n, w.shape[1]) else asym(w, 32, float_offset)


def variants() -> list[tuple[str, Weight, Act, bool]]:
    """(label, weight rounding, input rounding, keep the adapter in float32)."""
    return [
        ("int8 b16, level 4 (ours)", lambda n, w: sym(w, 8, 16), lambda n, x: act_blocks(x, 16), False),
        ("int8 b16, float activations (level 1)", lambda n, w: sym(w, 8, 16), None, False),
        ("int8 W8A8 per token", lambda n, w: per_channel8(w), lambda n, x: act_token(x), False),
        (
            "int8 W8A8 per tensor (quantize_dynamic)",
            lambda n, w: per_channel8(w),
            lambda n, x: act_tensor(x),
            False,
        ),
        ("int4 b16, down and head 8-bit b16 (ours)", _ours_int4, lambda n, x: act_blocks(x, 16), False),
        ("the same, --keep-adapter", _ours_int4, lambda n, x: act_blocks(x, 16), True),
        (
            "the same, scales searched (least squared error per block)",
            lambda n, w: searched(w, 8, 16) if wide(n, w.shape[1]) else searched(w, 4, 16),
            lambda n, x: act_blocks(x, 16),
            False,
        ),
        (
            "int4 b32, down and head 8-bit b64 (smaller)",
            lambda n, w: sym(w, _by_role(n, w.shape[1], 8, 4), _by_role(n, w.shape[1], 64, 32)),
            lambda n, x: act_blocks(x, _by_role(n, x.shape[-1], 64, 32)),
            False,
        ),
        (
            "int4 b32 everywhere, head 8-bit b32 (the builder's bytes)",
            lambda n, w: sym(w, 8 if n == "lm_head" else 4, 32),
            lambda n, x: act_blocks(x, 32),
            False,
        ),
        (
            "the same, scales searched",
            lambda n, w: searched(w, 8 if n == "lm_head" else 4, 32),
            lambda n, x: act_blocks(x, 32),
            False,
        ),
        (
            "int4 b32 asymmetric, uint8 zero points; down and head 8-bit b16",
            _asym_or_8(False),
            lambda n, x: act_blocks(x, _by_role(n, x.shape[-1], 16, 32)),
            False,
        ),
        (
            "int4 b32 asymmetric, float offsets; down and head 8-bit b16",
            _asym_or_8(True),
            lambda n, x: act_blocks(x, _by_role(n, x.shape[-1], 16, 32)),
            False,
        ),
        (
            "the same, --keep-adapter",
            _asym_or_8(True),
            lambda n, x: act_blocks(x, _by_role(n, x.shape[-1], 16, 32)),
            True,
        ),
    ]


# ---- running them ----------------------------------------------------------------------------------
def _linears(model) -> dict:
    """The projections a quantized export rounds: every transformer layer's and the LM head."""
    import torch

    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (".layers." in n or ".layer." in n or n == "lm_head")
    }


def run_variants(peft, evaluate: Callable[[object], dict], log) -> list[dict]:
    """Merge ``peft`` (PEFT, unmerged: its float32 references are taken already), then for each
    variant round the projections, ``evaluate(model)`` and restore them."""
    import torch

    # the base's own weights of the adapted projections, before merging (``keep``)
    bases = {
        n.removeprefix("base_model.model.").removesuffix(".base_layer"): m.weight.detach().clone()
        for n, m in peft.named_modules()
        if n.endswith(".base_layer")
    }
    model = peft.merge_and_unload().eval()
    HIDDEN[0] = model.config.hidden_size
    linears = _linears(model)
    merged = {n: m.weight.detach().clone() for n, m in linears.items()}
    rows = []
    for label, weight, act, keep in variants():
        t0 = time.perf_counter()
        hooks = []
        with torch.no_grad():
            for n, m in linears.items():
                if keep and n in bases:
                    m.weight.copy_(weight(n, bases[n]) + (merged[n] - bases[n]))
                else:
                    m.weight.copy_(weight(n, merged[n]))
                if act is not None:
                    hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n, f=act: (f(n, a[0]),)))
            try:
                figures = evaluate(model)
            finally:
                for h in hooks:
                    h.remove()
                for n, m in linears.items():
                    m.weight.copy_(merged[n])
        rows.append({"variant": label, **figures, "seconds": time.perf_counter() - t0})
        log(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    return rows


def measure_smollm2(real: Path, log) -> dict:
    """Top-1 and decisions kept on the prose, against PEFT float32 (``bench_prose``'s figures)."""
    import torch
    from bench_models import load_torch

    base_dir = real / "smollm2"
    ids = bench_prose.prose_ids(base_dir)
    peft = load_torch(base_dir, real / "smollm2-adapter", merged=False)
    peft_top1, base_top1 = bench_prose.references(peft, ids)
    x = torch.from_numpy(ids[None, :-1])

    def evaluate(model) -> dict:
        top1 = model(input_ids=x).logits[0].argmax(-1).numpy()
        a = bench_prose.agreement(peft_top1, base_top1, top1)
        return {"top1": a.top1, "kept": a.kept, "decisions": a.decisions}

    return {"positions": int(peft_top1.size), "rows": run_variants(peft, evaluate, log)}


def measure_minilm(real: Path, log) -> dict:
    """Worst and median cosine of sentence embeddings against PEFT float32 (``bench_minilm``'s)."""
    import bench_minilm
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    base = bench_minilm.minilm_dir()
    texts = bench_minilm.sentences()
    adapted, _ = bench_minilm.peft_embeddings(base, real / "minilm-adapter", texts)
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModel.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, real / "minilm-adapter").eval()
    batch = tok(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].unsqueeze(-1).double()

    def evaluate(model) -> dict:
        hidden = model(**batch).last_hidden_state.double()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        c = bench_minilm.compare(emb, adapted)
        return {"min_cos": c["min_cos"], "median_cos": c["median_cos"], "nn_same": c["nn_same"]}

    return {"sentences": len(texts), "rows": run_variants(peft, evaluate, log)}


def markdown(results: dict) -> str:
    lines = []
    if "smollm2" in results:
        r = results["smollm2"]
        lines += [
            f"Formats simulated in torch on the real SmolLM2-135M + its adapter, {r['positions']} positions "
            "of samples/real/prose.txt, against PEFT unmerged float32 (`benchmarks/sim_formats.py`).",
            "",
            "| format | top-1 | adapter decisions kept |",
            "|---|---:|---:|",
        ]
        for row in r["rows"]:
            share = f" ({100 * row['kept'] / row['decisions']:.0f}%)" if row["decisions"] else ""
            kept = f"{row['kept']}/{row['decisions']}{share}"
            lines.append(f"| {row['variant']} | {100 * row['top1']:.1f}% | {kept} |")
        lines.append("")
    if "minilm" in results:
        r = results["minilm"]
        lines += [
            "The same formats on the real all-MiniLM-L6-v2 (never quantized) + its adapter, "
            f"{r['sentences']} sentences of samples/real/sentences.txt: sentence embeddings against PEFT "
            "unmerged float32.",
            "",
            "| format | worst cosine | median cosine | nearest neighbour as PEFT's |",
            "|---|---:|---:|---:|",
        ]
        for row in r["rows"]:
            cos = f"{row['min_cos']:.4f} | {row['median_cos']:.4f}"
            lines.append(f"| {row['variant']} | {cos} | {100 * row['nn_same']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=Path("runs/real"), help="make demo-real's prepared models")
    ap.add_argument("--models", choices=("both", "smollm2", "minilm"), default="both")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    wanted = ("smollm2", "minilm") if args.models == "both" else (args.models,)
    needs = {"smollm2": ("smollm2/config.json", "smollm2-adapter"), "minilm": ("minilm-adapter",)}
    for m in wanted:
        missing = [p for p in needs[m] if not (args.real / p).exists()]
        if missing:
            sys.exit(f"{args.real}: no {', '.join(missing)} inside; run `make demo-real` first")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    if "smollm2" in wanted:
        results["smollm2"] = measure_smollm2(args.real, log)
    if "minilm" in wanted:
        results["minilm"] = measure_minilm(args.real, log)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
