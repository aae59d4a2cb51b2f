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

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from loraexport.core.dtypes import ONNX, TORCH
from loraexport.core.enums import Precision
from loraexport.errors import ExportError, first_line

MIN_ELEMENTS = 16  # smaller constants are not worth a Cast node
SUFFIX = "__stored_half"


def _half_bytes(arr: np.ndarray, dtype: str) -> bytes | None:
    """The tensor's bytes in ``dtype`` if the round trip is exact, else None."""
    t = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))  # a writable copy
    h = t.to(TORCH[Precision(dtype)])
    if not torch.equal(h.to(torch.float32), t):  # NaN never equals: such tensors stay float32
        return None
    return h.view(torch.int16).numpy().tobytes()


def _external(init: onnx.TensorProto) -> dict[str, str] | None:
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in init.external_data}


def _set_external(init: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    init.ClearField("raw_data")
    del init.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        init.external_data.add(key=key, value=value)
    init.data_location = onnx.TensorProto.EXTERNAL


class _DataWriter:
    """Appends tensors to a new external-data file, 64-byte aligned as onnx aligns them."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.offset = 0

    def put(self, init: onnx.TensorProto, data: bytes | memoryview, location: str) -> None:
        pad = -self.offset % 64
        self.f.write(b"\0" * pad)
        self.offset += pad
        self.f.write(data)
        _set_external(init, location, self.offset, len(data))
        self.offset += len(data)

    def close(self) -> None:
        self.f.close()


def store_weights_half(path: Path, dtype: str, external_threshold: int) -> dict[str, int]:
    """Rewrite ``path`` (an ONNX file, maybe with external data) with half-stored weights.

    A file with external data is rewritten tensor by tensor (memory-mapped in, appended out):
    memory stays near one tensor, whatever the model's size; the result keeps external data.
    A self-contained file is rewritten in memory, with external data only if it would still
    exceed ``external_threshold``.

    Returns counts: ``converted`` initializers, ``kept`` (float32, not representable or small),
    and the float32 ``bytes_before`` / ``bytes_after`` of the initializers.
    """
    if dtype not in Precision.choices(half_only=True):
        raise ExportError(
            f"unknown weights dtype {dtype!r}; choose from {', '.join(Precision.choices(half_only=True))}"
        )
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    data_file = path.with_name(path.name + ".data")
    streamed = any(_external(i) for i in graph.initializer)
    source = np.memmap(data_file, dtype=np.uint8, mode="r") if streamed else None
    writer = _DataWriter(path.with_name(path.name + ".data.tmp")) if streamed else None
    taken = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    taken |= {o for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    casts = []
    counts = {"converted": 0, "kept": 0, "bytes_before": 0, "bytes_after": 0}
    try:
        for init in graph.initializer:
            ext = _external(init)
            raw: memoryview | bytes | None = None
            if ext is not None:
                if ext.get("location") != data_file.name or "length" not in ext:
                    raise ExportError(f"{path.name}: unexpected external data entry {ext!r}")
                start = int(ext.get("offset", 0))
                raw = memoryview(source[start : start + int(ext["length"])])
            if init.data_type != onnx.TensorProto.FLOAT or init.name in inputs:  # overridable: leave it
                if raw is not None:
                    writer.put(init, raw, data_file.name)
                continue
            if raw is not None:
                arr = np.frombuffer(raw, dtype="<f4").reshape(tuple(init.dims))
            else:
                arr = numpy_helper.to_array(init)
            counts["bytes_before"] += arr.nbytes
            data = _half_bytes(arr, dtype) if arr.size >= MIN_ELEMENTS else None
            if data is None:
                counts["kept"] += 1
                counts["bytes_after"] += arr.nbytes
                if raw is not None:
                    writer.put(init, raw, data_file.name)
                continue
            name, half_name, n = init.name, init.name + SUFFIX, 0
            while half_name in taken:  # never shadow an existing name
                n += 1
                half_name = f"{name}{SUFFIX}{n}"
            taken.add(half_name)
            stored = onnx.TensorProto(name=half_name, data_type=ONNX[Precision(dtype)], dims=list(arr.shape))
            if writer is not None:
                writer.put(stored, data, data_file.name)
            else:
                stored.raw_data = data
            init.CopyFrom(stored)
            casts.append(helper.make_node("Cast", [half_name], [name], to=onnx.TensorProto.FLOAT))
            counts["converted"] += 1
            counts["bytes_after"] += len(data)
            del arr, data, raw
    finally:
        if writer is not None:
            writer.close()
        del source
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    if streamed:
        onnx.save_model(model, str(path))  # the graph only; the tensors are in the new data file
        os.replace(writer.f.name, data_file)
    else:
        external = counts["bytes_after"] > external_threshold
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
        raise ExportError(f"{path.name} with {dtype} weights fails onnx.checker: {first_line(e)}") from e
    return counts
