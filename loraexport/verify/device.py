"""What the latency harness does on CUDA (issue 13's item 7), kept apart from the timing loop:

- ``bound_forward``: a forward pass through an io-binding, its inputs copied to the device once
  and its outputs left there, so a timed call is the graph's own work (no host↔device copies);
- ``float16_export``: a copy of an export computing in float16 (onnxruntime's converter, float32
  inputs and outputs kept), timed as ``onnx_merged_fp16``: what a GPU user would deploy.

Both run on the CPU too (io-binding with device ``cpu``), which is how they are tested on a
machine without a GPU; the CUDA run itself needs ``CUDAExecutionProvider`` and a GPU.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from loraexport.runtime.model import OnnxModel, chain_forward

SINGLE_GRAPH = ("causal", "encoder")  # a seq2seq pass chains two sessions: timed as it runs


def bound_forward(model: OnnxModel, inputs: dict[str, np.ndarray], device: str) -> Callable[[], None] | None:
    """A call running ``model``'s prompt pass on ``inputs`` through an io-binding on ``device``
    (``cpu`` or ``cuda``); None for a model of two graphs."""
    if model.kind not in SINGLE_GRAPH:
        return None
    feeds: dict[str, np.ndarray] = {}

    def record(graph: str, given: dict) -> dict:  # chain_forward's feeds, as the runtime builds them
        feeds.update(given)
        return {}

    chain_forward(record, model.kind, model.cache_shape, inputs["input_ids"], inputs["attention_mask"])
    session = model.sessions["model"]
    io = session.io_binding()
    keep = []  # the device copies must outlive the binding
    for name in model.input_names["model"]:
        if name in feeds:
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[name]), device, 0)
            keep.append(value)
            io.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        io.bind_output(out.name, device)

    def call() -> None:
        session.run_with_iobinding(io)
        io.synchronize_outputs()

    call.inputs, call.io = keep, io  # type: ignore[attr-defined]  (alive with the call; tests read io)
    return call


def float16_export(src: Path, dst: Path) -> Path:
    """``src`` (an export folder) copied to ``dst`` with every graph computing in float16;
    inputs and outputs stay float32. Raises what the converter raises."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".onnx", ".onnx.data")):
            shutil.copy2(f, dst / f.name)
    for graph in src.glob("*.onnx"):
        model = convert_float_to_float16(onnx.load(str(graph)), keep_io_types=True)
        large = model.ByteSize() > 2**31 - 2**24 if hasattr(model, "ByteSize") else False
        onnx.save_model(
            model, str(dst / graph.name), save_as_external_data=large, location=f"{graph.name}.data"
        )
    return dst
