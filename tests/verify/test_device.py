"""The CUDA parts of the latency harness (``verify.device``), checked where they can be: on the
CPU, with the same io-binding code and device ``cpu``. The CUDA run itself is skipped on a
machine without ``CUDAExecutionProvider`` and a GPU (this project's CI), with that reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from artifacts import make_hf_decoder, make_peft_adapter

from loraexport.runtime.model import OnnxModel
from loraexport.stages.export import export
from loraexport.stages.inputs import load_inputs
from loraexport.stages.merge import merged_model, unmerged_model
from loraexport.verify.device import bound_forward, float16_export
from loraexport.verify.latency import measure_latency

pytestmark = pytest.mark.slow
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    model = make_hf_decoder(tmp / "base", "llama")
    make_peft_adapter(model, tmp / "adapter", "llama")
    export(tmp / "base", tmp / "merged", adapter=tmp / "adapter")
    export(tmp / "base", tmp / "base-onnx")
    return tmp


def test_a_bound_forward_computes_what_forward_does(llama):
    """The io-binding call (inputs bound once, outputs left on the device) gives the plain
    call's logits exactly: the same session on the same inputs."""
    model = OnnxModel(llama / "merged")
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 9))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    call = bound_forward(model, inputs, "cpu")
    call()
    names = [o.name for o in model.sessions["model"].get_outputs()]
    logits = call.io.copy_outputs_to_cpu()[names.index("logits")]
    np.testing.assert_array_equal(logits, model.forward(ids, np.ones_like(ids)))


def test_a_float16_copy_computes_in_float16_with_float32_io(llama, tmp_path):
    half = float16_export(llama / "merged", tmp_path / "fp16")
    graph = onnx.load(str(half / "model.onnx")).graph
    weights = [t for t in graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    floats = [v for v in [*graph.input, *graph.output] if v.type.tensor_type.elem_type in (1, 10)]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in floats)
    assert (half / "loraexport.json").is_file()


def _measure(llama, provider: str, bound: bool):
    loaded = load_inputs(llama / "base", [llama / "adapter"])
    models = {
        "torch_unmerged": unmerged_model(loaded.base, loaded.adapters),
        "torch_merged": merged_model(loaded.base, loaded.adapters)[0],
    }
    dirs = {"onnx_merged": (llama / "merged", None), "onnx_base": (llama / "base-onnx", None)}
    return measure_latency(
        loaded.family, provider, 2, models, dirs, budget_s=0.05, points=((1, 8),), bound=bound
    )


def test_the_harness_times_bound_calls(llama):
    """What CUDA runs, on the CPU: every ONNX variant timed through its io-binding."""
    (case,) = _measure(llama, "cpu", bound=True).cases
    assert {"onnx_merged", "onnx_base", "torch_unmerged"} <= set(case.stats)
    assert all(s.runs >= 3 and s.p50_ms > 0 for s in case.stats.values())


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider and a CUDA GPU")
def test_cuda_latency_has_a_float16_variant(llama):
    (case,) = _measure(llama, "cuda", bound=None).cases
    assert "onnx_merged_fp16" in case.stats and case.stats["onnx_merged_fp16"].p50_ms > 0
