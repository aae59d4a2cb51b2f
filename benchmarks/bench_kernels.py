"""Which onnxruntime CPU kernel can carry a quantized projection on this host: one node (or the
few a format needs), timed alone at the SmolLM2-135M shapes, for a decode step (M = 1 row) and a
128-token prompt pass (M = 128).

Issue 25 asks the int4/int8 prompt pass for ≤ 0.6× float32's time and the decode for far more than
the builder's speed; this table says what each of onnxruntime's kernels can give, so a format is
chosen (or refused) on measurement:

- ``MatMul`` float32 (MLAS SGEMM): the reference;
- ``MatMulNBits`` 4/8 bits, blocks of 16/32/64, accuracy level 4 (activations int8 per block: the
  kernel our int8/int4 exports use), level 1 (float32 arithmetic) and, for int8, level 3 (bf16:
  whether this CPU has a faster float path than level 1's);
- ``MatMulNBits`` with zero points: uint8 (asymmetric int4, integer offsets) and float32 (a float
  offset per block, as HQQ or GGUF's Q4_1 store it);
- a float offset per block computed beside a symmetric ``MatMulNBits``: w = scale·(code − 8) +
  offset, so x·wᵀ = MatMulNBits(x) + (x's sums per block)·offsetᵀ, a ``ReduceSum`` and a float
  MatMul with K / block rows (the asymmetric format of HQQ or Q4_1 in kernels that run fast);
- W8A8: ``MatMulInteger`` (uint8 activations × int8 weights per output channel) with activations
  quantized per tensor (``DynamicQuantizeLinear``, what ``quantize_dynamic`` writes) and per token
  (a scale per row: ``ReduceMax`` of ``|x|`` → ``QuantizeLinear`` along axis 0 → ``MatMulInteger``
  → rescale), its quantization ops included in its time.

Each cell: the median microseconds of a variant's runs, taken in blocks (``ROUNDS`` rounds, each
running every variant's block in turn, so that a noisy moment disturbs all alike); the inputs and
weights random (timing does not depend on values); ``threads`` intra-op threads with spinning on,
as an app runs (a block's first runs absorb the previous session's spinning tail and are not
timed). The weights of one node stay in the caches between runs, so M = 1 cells are kernel speed,
not the memory-bound speed of a whole model's decode (``bench.py`` has that).

    python benchmarks/bench_kernels.py [--threads 2] [--runs 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine  # noqa: E402

from loraexport.runtime.model import session_options  # noqa: E402

MS = "com.microsoft"
# SmolLM2-135M's projections: (label, K, N); gate|up packed as the fused export writes it
SHAPES = (("gate|up 576→3072", 576, 3072), ("down 1536→576", 1536, 576))
ROWS = (1, 128)  # a decode step; a 128-token prompt pass
ROUNDS = 5
WARM = 3  # untimed runs starting each block

Nodes = tuple[list, list]  # (nodes, initializers) computing "y" (M, N) float32 from "x" (M, K)


def _nbits(k: int, n: int, bits: int, block: int, level: int, zero: str | None, rng) -> Nodes:
    blocks = -(-k // block)
    packed = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
    scales = rng.random(n * blocks, dtype=np.float32) / 64
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")]
    inputs = ["x", "b", "s"]
    if zero == "uint8":  # packed like the codes: 8 // bits offsets a byte
        per_byte = 8 // bits
        offsets = rng.integers(0, 256, n * -(-blocks // per_byte), dtype=np.uint8)
        inits.append(numpy_helper.from_array(offsets, "z"))
        inputs.append("z")
    elif zero == "float":
        inits.append(numpy_helper.from_array((rng.random(n * blocks, dtype=np.float32) * 8), "z"))
        inputs.append("z")
    node = helper.make_node(
        "MatMulNBits", inputs, ["y"], domain=MS, K=k, N=n, bits=bits, block_size=block, accuracy_level=level
    )
    return [node], inits


def _offset(k: int, n: int, block: int, rng) -> Nodes:
    """Symmetric MatMulNBits int4 plus the float offsets' term: block sums of x times offsets."""
    nodes, inits = _nbits(k, n, 4, block, 4, None, rng)
    nodes[0].output[0] = "codes_part"
    inits += [
        numpy_helper.from_array(np.array([0, k // block, block], np.int64), "blocked"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(rng.standard_normal((k // block, n), dtype=np.float32) / 64, "offsets"),
    ]
    nodes += [
        helper.make_node("Reshape", ["x", "blocked"], ["x_blocks"]),
        helper.make_node("ReduceSum", ["x_blocks", "last"], ["x_sums"], keepdims=0),  # (M, K / block)
        helper.make_node("MatMul", ["x_sums", "offsets"], ["offset_part"]),
        helper.make_node("Add", ["codes_part", "offset_part"], ["y"]),
    ]
    return nodes, inits


def _float(k: int, n: int, rng) -> Nodes:
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    return [helper.make_node("MatMul", ["x", "w"], ["y"])], [w]


def _w8a8(k: int, n: int, per_token: bool, rng) -> Nodes:
    """uint8 activations × int8 weights (per output channel, symmetric) → int32 → float32."""
    w = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w")
    w_scale = numpy_helper.from_array(rng.random(n, dtype=np.float32) / 64, "w_scale")
    inits = [w, w_scale]
    if per_token:  # symmetric per row, offset 128: uint8 codes, one zero point for all rows
        inits += [
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
            numpy_helper.from_array(np.array(127.0, np.float32), "levels"),
            numpy_helper.from_array(np.array([-1], np.int64), "flat"),
            numpy_helper.from_array(np.array(128, np.uint8), "zp"),
            numpy_helper.from_array(np.array([-1, 1], np.int64), "column"),
        ]
        nodes = [
            helper.make_node("Abs", ["x"], ["abs"]),
            helper.make_node("ReduceMax", ["abs", "last"], ["amax"], keepdims=1),
            helper.make_node("Div", ["amax", "levels"], ["scale"]),  # (M, 1); an all-zero row: see below
            helper.make_node("Reshape", ["scale", "flat"], ["scale_rows"]),
            helper.make_node("Shape", ["x"], ["m"], start=0, end=1),
            helper.make_node("Expand", ["zp", "m"], ["zp_rows"]),
            # (timing only: random inputs have no all-zero row, whose scale 0 a format must guard)
            helper.make_node("QuantizeLinear", ["x", "scale_rows", "zp_rows"], ["xq"], axis=0),
            helper.make_node("MatMulInteger", ["xq", "w", "zp"], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["accf", "scale"], ["rows"]),
            helper.make_node("Mul", ["rows", "w_scale"], ["y"]),
        ]
        return nodes, inits
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "x_scale", "x_zp"]),
        helper.make_node("MatMulInteger", ["xq", "w", "x_zp"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["accf", "x_scale"], ["rows"]),
        helper.make_node("Mul", ["rows", "w_scale"], ["y"]),
    ]
    return nodes, inits


def variants() -> list[tuple[str, Callable[[int, int, np.random.Generator], Nodes]]]:
    out: list = [("MatMul float32", _float)]
    nbits = ((4, 16, 4), (4, 32, 4), (4, 64, 4), (4, 32, 1), (8, 16, 4), (8, 64, 4), (8, 16, 1), (8, 16, 3))
    for bits, block, level in nbits:
        label = f"MatMulNBits int{bits} b{block} level {level}"
        out.append((label, lambda k, n, rng, b=bits, bl=block, lv=level: _nbits(k, n, b, bl, lv, None, rng)))
    for zero in ("uint8", "float"):
        label = f"MatMulNBits int4 b32 level 4, {zero} zero points"
        out.append((label, lambda k, n, rng, z=zero: _nbits(k, n, 4, 32, 4, z, rng)))
    offset = "MatMulNBits int4 b32 level 4 + float offsets beside it"
    out.append((offset, lambda k, n, rng: _offset(k, n, 32, rng)))
    out.append(("W8A8 MatMulInteger, activations per tensor", lambda k, n, rng: _w8a8(k, n, False, rng)))
    out.append(("W8A8 MatMulInteger, activations per token", lambda k, n, rng: _w8a8(k, n, True, rng)))
    return out


def _session(nodes: Nodes, k: int, n: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes[0],
        "kernel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        nodes[1],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    options = session_options(threads, spinning=True)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(threads: int, runs: int, shapes=SHAPES, rows=ROWS) -> list[dict]:
    """One row per (shape, M, variant): median µs, and the ratio to float32 MatMul's."""
    out = []
    for label, k, n in shapes:
        for m in rows:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((m, k), dtype=np.float32)
            sessions = [(name, _session(make(k, n, rng), k, n, threads)) for name, make in variants()]
            times: dict[str, list[float]] = {name: [] for name, _ in sessions}
            for _ in range(ROUNDS):
                for name, s in sessions:
                    for _ in range(WARM):
                        s.run(None, {"x": x})
                    for _ in range(runs):
                        t0 = time.perf_counter()
                        s.run(None, {"x": x})
                        times[name].append(time.perf_counter() - t0)
            base = float(np.median(times["MatMul float32"]))
            for name, ts in times.items():
                med = float(np.median(ts))
                out.append({"shape": label, "k": k, "n": n, "m": m, "variant": name,
                            "us": med * 1e6, "x_float32": med / base})  # fmt: skip
    return out


def markdown(rows: list[dict], host: str, threads: int) -> str:
    cols = list(dict.fromkeys((r["shape"], r["m"]) for r in rows))  # in the order measured
    lines = [
        f"Kernels alone, {host}, {threads} threads, onnxruntime {ort.__version__}: median µs "
        "(× float32 MatMul's; below 1 is faster).",
        "",
        "| kernel | " + " | ".join(f"{s}, M={m}" for s, m in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, _ in variants():
        cells = []
        for s, m in cols:
            r = next(r for r in rows if r["variant"] == name and r["shape"] == s and r["m"] == m)
            cells.append(f"{r['us']:.0f} ({r['x_float32']:.2f}×)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per block")
    ap.add_argument("--json", type=Path, help="write the rows and the host here")
    args = ap.parse_args()
    if args.threads < 1 or args.runs < 1:
        ap.error("--threads and --runs must be at least 1")
    m = machine()
    host = f"{m['cpu']}, {m['cores']} cores ({' '.join(m['isa'])})"
    rows = measure(args.threads, args.runs)
    print(markdown(rows, host, args.threads))
    if args.json:
        args.json.write_text(json.dumps({"host": m, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
