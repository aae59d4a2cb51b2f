"""ONNX files an app is about to run, checked before onnxruntime reads or maps them: the file's
size, and every external tensor's location and bounds (``check_external_data``). Torch-free:
``loraexport.runtime`` uses it and re-exports its names."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from loraexport.core.untrusted import short_repr
from loraexport.errors import InvalidInputError, first_line

# protobuf cannot parse a message over 2 GiB (INT_MAX bytes): a larger .onnx is no ONNX model,
# and is refused from its size alone, before a byte of it is read. Weights beyond it live in
# external data (<name>.onnx.data), which onnxruntime maps instead of reading.
MAX_ONNX_BYTES = 2**31 - 1
# Storage bits of the element types narrower than a byte (packed); the others take whole bytes.
_SUB_BYTE_BITS = {
    "INT4": 4,
    "UINT4": 4,
    "FLOAT4E2M1": 4,
    "INT2": 2,
    "UINT2": 2,
    "FLOAT6E2M3": 6,
    "FLOAT6E3M2": 6,
}


class RuntimeInputError(InvalidInputError, ValueError):
    """The exported directory cannot be run (missing files, unsafe external data), or a call's
    inputs do not fit it (ids, shapes, lengths): refused before onnxruntime sees them."""


def _tensors(graph):
    """Every TensorProto of ``graph``: initializers, sparse ones, and node attributes
    (``Constant`` values, tensors in subgraphs of ``If``/``Loop``/``Scan``), recursively."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _regular_size(path: Path, what: str) -> int:
    """The size of ``path``, a regular file (a FIFO or a device would block or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise RuntimeInputError(f"{what} not found: {path}") from e
    except (OSError, ValueError) as e:  # a loop of links, a name too long, a NUL byte
        raise RuntimeInputError(f"{what} cannot be read: {path} ({getattr(e, 'strerror', None) or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise RuntimeInputError(f"{what} is not a regular file: {path}")
    return st.st_size


def _min_bytes(tensor) -> int | None:
    """The fewest bytes ``tensor``'s elements take (packed sub-byte types too); None for strings
    and unknown types, whose size the shape does not give."""
    import onnx

    try:
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        bits = _SUB_BYTE_BITS.get(name) or 8 * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (ValueError, KeyError, TypeError):
        return None
    if name == "STRING":
        return None
    n = 1
    for d in tensor.dims:
        n *= max(d, 0)
    return (n * bits + 7) // 8


def _check_external_tensor(path: Path, root: Path, tensor) -> None:
    """Refuse external data that is outside ``root``, not a regular file, or too short for the
    tensor (onnxruntime maps it: reading past the end of a mapping kills the process)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    try:
        target = (root / location).resolve()
    except (ValueError, OSError) as e:
        raise RuntimeInputError(f"{path.name}: unusable external data location {location!r}") from e
    if root not in target.parents:  # the directory itself is no data file either
        raise RuntimeInputError(
            f"{path.name}: external data {location!r} points outside {root}; refusing to load"
        )
    size = _regular_size(target, f"external data of {path.name}")
    fields = {}
    for key in ("offset", "length"):
        value = info.get(key, "0" if key == "offset" else None)
        if value is None:
            continue
        if not value.isascii() or not value.isdigit() or len(value) > 20:
            raise RuntimeInputError(
                f"{path.name}: tensor {tensor.name!r} has external data {key} {short_repr(value)}, "
                "not a non-negative integer"
            )
        fields[key] = int(value)
    offset = fields["offset"]
    needed = max(n for n in (fields.get("length"), _min_bytes(tensor), 0) if n is not None)
    if offset + needed > size:
        raise RuntimeInputError(
            f"{path.name}: tensor {tensor.name!r} needs bytes {offset:,}..{offset + needed:,} of "
            f"{location}, which holds {size:,}; refusing to load"
        )


def check_external_data(path: Path) -> None:
    """Refuse an ONNX file that cannot be one (over protobuf's 2 GiB, not a regular file), cannot
    be parsed, or any of whose tensors keeps its data outside the file's own directory (``../x``,
    an absolute path, a link leading out) or beyond the end of its data file. Sizes are checked
    before anything is read."""
    import onnx  # part of the runtime dependencies; only the protobuf is parsed

    size = _regular_size(path, "ONNX file")
    if size > MAX_ONNX_BYTES:
        raise RuntimeInputError(
            f"{path}: {size:,} bytes, over protobuf's 2 GiB limit for an ONNX file (weights that "
            "large belong in external data, <name>.onnx.data); refusing to read it"
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise RuntimeInputError(f"{path}: not a readable ONNX model ({first_line(e)})") from e
    root = path.parent.resolve()
    for tensor in _tensors(model.graph):
        if tensor.external_data:
            _check_external_tensor(path, root, tensor)
