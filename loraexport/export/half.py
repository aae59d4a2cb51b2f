"""Store an exported graph's weights in float16 or bfloat16, losslessly, computing in float32.

The model is exported from weights already rounded to the half dtype (``merge --dtype``'s
values, upcast exactly to float32). Every float32 initializer whose values all survive the
round trip to the half dtype is then stored in it, behind a ``Cast`` to float32; anything
else (constants the exporter derived, which are not representable) stays float32. So the
graph computes exactly what the float32 export of the rounded weights computes, in half
the bytes: verification of the file against the rounded model is exact, and what the
rounding costs against the unmerged model is reported beside it (``verify.half``).

onnxruntime folds the casts when it loads the model: the session holds float32 weights.
Initializers that are also graph inputs (overridable) and those inside subgraphs are left
as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from loraexport.errors import ExportError

HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_ONNX_TYPE = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}
MIN_ELEMENTS = 16  # smaller constants are not worth a Cast node
SUFFIX = "__stored_half"


def _half_bytes(arr: np.ndarray, dtype: str) -> bytes | None:
    """The tensor's bytes in ``dtype`` if the round trip is exact, else None."""
    t = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))  # a writable copy
    h = t.to(HALF_DTYPES[dtype])
    if not torch.equal(h.to(torch.float32), t):  # NaN never equals: such tensors stay float32
        return None
    return h.view(torch.int16).numpy().tobytes()


def store_weights_half(path: Path, dtype: str, external_threshold: int) -> dict[str, int]:
    """Rewrite ``path`` (an ONNX file, maybe with external data) with half-stored weights.

    Returns counts: ``converted`` initializers, ``kept`` (float32, not representable or small),
    and the float32 ``bytes_before`` / ``bytes_after`` of the initializers.
    """
    if dtype not in HALF_DTYPES:
        raise ExportError(f"unknown weights dtype {dtype!r}; choose from {', '.join(HALF_DTYPES)}")
    model = onnx.load(str(path))  # with its external data, if any
    graph = model.graph
    taken = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    taken |= {o for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    casts = []
    counts = {"converted": 0, "kept": 0, "bytes_before": 0, "bytes_after": 0}
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in inputs:  # an overridable input: leave it
            continue
        arr = numpy_helper.to_array(init)
        counts["bytes_before"] += arr.nbytes
        data = _half_bytes(arr, dtype) if arr.size >= MIN_ELEMENTS else None
        if data is None:
            counts["kept"] += 1
            counts["bytes_after"] += arr.nbytes
            continue
        name, half_name, n = init.name, init.name + SUFFIX, 0
        while half_name in taken:  # never shadow an existing name
            n += 1
            half_name = f"{name}{SUFFIX}{n}"
        taken.add(half_name)
        stored = onnx.TensorProto(name=half_name, data_type=_ONNX_TYPE[dtype], dims=list(arr.shape))
        stored.raw_data = data
        init.CopyFrom(stored)
        casts.append(helper.make_node("Cast", [half_name], [name], to=onnx.TensorProto.FLOAT))
        counts["converted"] += 1
        counts["bytes_after"] += len(data)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    external = counts["bytes_after"] > external_threshold
    data_file = path.with_name(path.name + ".data")
    if data_file.exists():
        data_file.unlink()  # rewritten below, or no longer needed
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data_file.name,
        size_threshold=1024,
    )
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(
            f"{path.name} with {dtype} weights fails onnx.checker: {str(e).splitlines()[0]}"
        ) from e
    return counts
