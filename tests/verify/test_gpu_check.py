"""``make gpu-check`` (``benchmarks/gpu_check.py``): on a machine without a CUDA GPU it says so and
exits 0 (CI's machines); a GPU whose onnxruntime lacks the CUDA provider is a set-up error, exit 2;
a failing step exits 1. The GPU run itself needs a GPU (``make gpu-check`` on one)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_and_exits_0():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    gpu = _module().cuda_state()[0]
    if gpu:
        pytest.skip("this machine has a CUDA GPU: make gpu-check runs the checks")
    assert r.returncode == 0 and "no CUDA device" in r.stdout, r.stdout + r.stderr


def test_a_gpu_without_onnxruntimes_cuda_provider_exits_2(monkeypatch, capsys):
    module = _module()
    monkeypatch.setattr(module, "cuda_state", lambda: (True, False))
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2 and "onnxruntime-gpu" in capsys.readouterr().err


def test_a_failing_step_exits_1(monkeypatch):
    module = _module()
    with pytest.raises(SystemExit) as e:
        module.step("a command that fails", [sys.executable, "-c", "raise SystemExit(3)"])
    assert e.value.code == 1
