"""An ONNX file's graph and initializers, read one tensor at a time: the graph without its
weights, each external tensor by its offset when asked for (bounded by the largest tensor, not the
model). Its external data is checked first (``onnx_files.check_external_data``: inside the file's
folder, within the data file's bounds). No torch here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from loraexport.runtime.files import RuntimeInputError, check_external_data

BLOCK = 1 << 24  # bytes compared at a time


class TensorFile:
    """``path``'s graph (``proto``, weights not loaded) and its initializers by name."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        check_external_data(self.path)  # RuntimeInputError: not a usable ONNX file
        self.proto = onnx.load(str(self.path), load_external_data=False)
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.duplicates: list[str] = []
        for t in self.proto.graph.initializer:
            if t.name in self.initializers:
                self.duplicates.append(t.name)
            self.initializers[t.name] = t
        self._files: dict[str, object] = {}

    def array(self, name: str) -> np.ndarray:
        """The initializer ``name`` as an array (read from its external data if it has some)."""
        return tensor_array(self.initializers[name], self._read_external)

    def same_bytes(self, name: str, data: memoryview | bytes) -> bool:
        """Whether initializer ``name`` holds exactly ``data`` (its raw little-endian bytes), read a
        block at a time when external: nothing the size of the tensor is held."""
        t = self.initializers[name]
        view = memoryview(data).cast("B")
        if not (t.data_location == onnx.TensorProto.EXTERNAL or t.external_data):
            return self.array(name).tobytes() == view.tobytes()
        info = {e.key: e.value for e in t.external_data}
        length = int(info["length"]) if "length" in info else _nbytes(t)
        if length != len(view):
            return False
        f = self._open(info.get("location", ""))
        f.seek(int(info.get("offset", "0")))
        for start in range(0, length, BLOCK):
            if f.read(BLOCK if start + BLOCK <= length else length - start) != view[start : start + BLOCK]:
                return False
        return True

    def _open(self, location: str):
        f = self._files.get(location)
        if f is None:
            f = self._files[location] = open(self.path.parent / location, "rb")  # noqa: SIM115
        return f

    def _read_external(self, t: onnx.TensorProto) -> bytes:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        f = self._open(location)
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else _nbytes(t)
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise RuntimeInputError(f"{self.path.name}: tensor {t.name!r} is cut short in {location}")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nbytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def tensor_array(t: onnx.TensorProto, read_external=None) -> np.ndarray:
    """``t``'s values (raw bytes, typed fields or external data through ``read_external``)."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data:
        if read_external is None:
            raise ValueError(f"tensor {t.name!r} is external and no reader was given")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.frombuffer(read_external(t), dtype=dtype).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)
