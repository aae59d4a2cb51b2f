"""``make gpu-check``: what only a CUDA GPU can check, in one short run (a few minutes).

1. the CUDA tests (``tests/verify/test_device.py``: io-binding, the float16 variant);
2. one ``loraexport verify --provider cuda`` of the sample model (a short training run, then an
   export), parity on the GPU and its latency rows, printed from the report.

On a machine without a CUDA GPU it says "no CUDA device" and exits 0: CI runs on CPUs. A GPU whose
onnxruntime has no ``CUDAExecutionProvider`` (the CPU wheel) is a set-up error: exit 2, saying what
to install. Any check that fails: exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 60  # the sample adapter: enough to move the outputs, a few seconds


def cuda_state() -> tuple[bool, bool]:
    """(torch sees a CUDA GPU, onnxruntime has its CUDA provider)."""
    import onnxruntime as ort
    import torch

    return torch.cuda.is_available(), "CUDAExecutionProvider" in ort.get_available_providers()


def step(what: str, cmd: list, **kw) -> None:
    print(f"\n== {what}\n$ {' '.join(map(str, cmd))}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, **kw)
    print(f"-- {time.perf_counter() - t0:.1f} s, exit {r.returncode}", flush=True)
    if r.returncode not in (0,):
        sys.exit(1)


def latency_rows(report: Path) -> list[str]:
    """The report's CUDA latency rows, as report.md writes them."""
    md = report.with_suffix(".md").read_text(encoding="utf-8").splitlines()
    out, inside = [], False
    for line in md:
        if line.startswith("## "):
            inside = line.startswith("## Latency") and "cuda" in line
        if inside:
            out.append(line)
    return out


def main() -> None:
    gpu, ort_cuda = cuda_state()
    if not gpu:
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False): nothing to check here")
        return
    if not ort_cuda:
        print(
            "gpu-check: a CUDA GPU, but this onnxruntime has no CUDAExecutionProvider: install the "
            "onnxruntime-gpu wheel of the same version in .venv, then run make gpu-check again",
            file=sys.stderr,
        )
        sys.exit(2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    step(
        "CUDA tests",
        [BIN / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/verify/test_device.py"],
        env=env,
    )
    with tempfile.TemporaryDirectory(prefix="loraexport-gpu-check-") as td:
        tmp = Path(td)
        cli = BIN / "loraexport"
        adapter, onnx_dir, report = tmp / "adapter", tmp / "onnx", tmp / "report.json"
        data_file = "samples/data/sort_train.jsonl"
        train = [
            cli,
            "train",
            "--base",
            "samples/base",
            "--data",
            data_file,
            "--out",
            adapter,
            "--steps",
            STEPS,
        ]
        step("the sample adapter", train, env=env)
        step(
            "export",
            [cli, "export", "--model", "samples/base", "--adapter", adapter, "--out", onnx_dir],
            env=env,
        )
        verify = [cli, "verify", "--base", "samples/base", "--adapter", adapter, "--onnx", onnx_dir]
        step(
            "verify --provider cuda",
            [*verify, "--provider", "cpu", "--provider", "cuda", "--report", report],
            env=env,
        )
        data = json.loads(report.read_text(encoding="utf-8"))
        providers = sorted(data.get("parity_by_provider") or {})
        print(f"\npassed: {data.get('passed')}; parity checked on: {', '.join(providers)}")
        print("\n".join(latency_rows(report)) or "no CUDA latency rows in the report")
    print("\ngpu-check: passed")


if __name__ == "__main__":
    main()
