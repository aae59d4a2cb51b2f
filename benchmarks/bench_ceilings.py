"""The machine's ceilings, measured in the run that uses them (same threads, same load).

- GEMM peak: one float32 MatMul N×N×N in onnxruntime (MLAS), the weight a constant as in a model;
  GFLOP/s = 2N³ / median time.
- Read bandwidth: ReduceSum over a float32 tensor much larger than the caches, in onnxruntime;
  GB/s = bytes / median time. (Decoding reads the weights once per token: that is the bound.)
- Copy bandwidth: numpy ``copyto`` between two such buffers, counted as read + write bytes.
- torch's own float32 GEMM (``torch.mm``, N×N×N): not a ceiling, but what bounds the torch rows
  (pip's torch calls MKL, whose kernel choice depends on the CPU's vendor).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from loraexport.runtime.model import session_options


def _median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: allocations, prepacking
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _session(graph: onnx.GraphProto, threads: int) -> ort.InferenceSession:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )


def gemm_gflops(threads: int, n: int = 2048, runs: int = 7) -> float:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [w],
    )
    sess = _session(graph, threads)
    x = rng.standard_normal((n, n), dtype=np.float32)
    return 2.0 * n**3 / _median_seconds(lambda: sess.run(None, {"x": x}), runs) / 1e9


def read_gbps(threads: int, mbytes: int = 512, runs: int = 9) -> float:
    rows = mbytes * 2**20 // 4 // 4096
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        "read",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 4096]),
            helper.make_tensor_value_info("axes", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows])],
    )
    sess = _session(graph, threads)
    x = ort.OrtValue.ortvalue_from_numpy(np.ones((rows, 4096), dtype=np.float32))  # no copy per run
    axes = ort.OrtValue.ortvalue_from_numpy(np.array([1], dtype=np.int64))
    names = ["y"]
    secs = _median_seconds(lambda: sess.run_with_ort_values(names, {"x": x, "axes": axes}), runs)
    return rows * 4096 * 4 / secs / 1e9


def copy_gbps(mbytes: int = 512, runs: int = 7) -> float:
    src = np.ones(mbytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _median_seconds(lambda: np.copyto(dst, src), runs) / 1e9


def torch_gemm_gflops(threads: int, n: int = 2048, runs: int = 7) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n**3 / _median_seconds(lambda: torch.mm(a, b), runs) / 1e9


def measure(threads: int, quick: bool = False) -> dict[str, float]:
    n, mb = (1024, 256) if quick else (2048, 512)
    return {
        "gemm_gflops": gemm_gflops(threads, n),
        "torch_gemm_gflops": torch_gemm_gflops(threads, n),
        "read_gbps": read_gbps(threads, mb),
        "copy_gbps": copy_gbps(mb),
        "gemm_n": n,
        "buffer_mb": mb,
    }
