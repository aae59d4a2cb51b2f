"""Streaming merge of a safetensors checkpoint: one tensor in memory at a time.

Reads each shard's header, then writes a new shard tensor by tensor: a targeted weight is
decoded, merged (``merge.merge_state_dict`` on that one tensor, so the result is
bit-identical to the in-memory merge) and encoded; every other tensor's bytes are copied
as they are, never decoded. Sharded checkpoints keep their shards and index. No model
object is built, so memory is bounded by the largest tensor plus the adapters.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraexport.artifact.schema import META
from loraexport.core.io import parse_json, read_json, short_repr
from loraexport.errors import AdapterMismatchError, ModelFormatError
from loraexport.lora.adapter import Adapter
from loraexport.lora.merge import MergeStats, cast_checked, merge_state_dict

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
COPY_CHUNK = 16 * 1024 * 1024


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """Tensors of a safetensors file (in data order) and its ``__metadata__``; every
    inconsistency (length beyond the file, bad JSON, malformed entries, offsets out of range,
    overlapping or gapped data) is a ModelFormatError naming the file and the tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFormatError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise ModelFormatError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        header = parse_json(f.read(n), f"{path}: header", ModelFormatError)
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ModelFormatError(f"{path}: __metadata__ must map names to strings, got {short_repr(meta)}")
    base = 8 + n
    tensors = []
    for name, info in header.items():
        tensors.append(_tensor_info(path, name, info, base, size))
    tensors.sort(key=lambda t: (t.start, t.end))
    end = base
    for t in tensors:  # safetensors' layout: tensors back to back, from the header to the end
        if t.start != end:
            what = (
                "overlaps the previous tensor" if t.start < end else f"leaves a gap of {t.start - end} bytes"
            )
            raise ModelFormatError(f"{path}: tensor {t.name!r}'s data {what}")
        end = t.end
    if end != size:
        raise ModelFormatError(f"{path}: {size - end} bytes after the last tensor's data")
    return tensors, meta


def _is_index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor_info(path: Path, name: str, info: object, base: int, size: int) -> TensorInfo:
    """One header entry, checked: dtype known, shape of non-negative ints, offsets in range."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape: JSON allows it, safetensors does not
        raise ModelFormatError(f"{path}: tensor name {name!r} is not valid Unicode") from e
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        raise ModelFormatError(
            f"{path}: tensor {name!r} has a malformed header entry (needs dtype, shape and "
            f"data_offsets): {short_repr(info)}"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelFormatError(f"{path}: tensor {name!r} has unsupported dtype {short_repr(dtype)}")
    if not (isinstance(shape, list) and all(_is_index(d) for d in shape)):
        raise ModelFormatError(
            f"{path}: tensor {name!r} has shape {short_repr(shape)}, not a list of non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
        raise ModelFormatError(
            f"{path}: tensor {name!r} has data_offsets {short_repr(offsets)}, not [begin, end]"
        )
    b, e = offsets
    count = math.prod(shape)
    if not (b <= e and base + e <= size and e - b == count * _itemsize(dtype)):
        raise ModelFormatError(
            f"{path}: tensor {name!r} has data offsets [{b}, {e}] out of range "
            f"(or not the size of a {dtype} tensor of shape {shape})"
        )
    return TensorInfo(name, dtype, list(shape), base + b, base + e)


def _itemsize(code: str) -> int:
    return torch.empty(0, dtype=DTYPES[code]).element_size()


def checkpoint_shards(directory: Path) -> tuple[list[str], dict | None]:
    """Shard file names (and the index JSON, if sharded) of a safetensors checkpoint."""
    if (directory / INDEX).is_file():
        index = read_json(directory / INDEX, ModelFormatError)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(wmap, dict) and wmap and all(isinstance(v, str) for v in wmap.values())):
            raise ModelFormatError(
                f"{directory / INDEX}: not a valid safetensors index (needs a 'weight_map' "
                "of tensor names to shard file names)"
            )
        shards = sorted(set(wmap.values()))
        for s in shards:
            if Path(s).name != s or not _is_file(directory / s):
                raise ModelFormatError(f"{directory / INDEX}: shard {s!r} is missing or outside the folder")
        return shards, index
    if (directory / SINGLE).is_file():
        return [SINGLE], None
    raise ModelFormatError(f"{directory}: no {SINGLE} or {INDEX}")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a file we can have
        return False


def _header_bytes(entries: list[tuple[str, str, list[int], int]], meta: dict) -> bytes:
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def stream_merge(
    base: Path,
    adapters: list[Adapter],
    out: Path,
    weights: list[float] | None = None,
    *,
    storage_dtype: torch.dtype | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_file: Callable[[Path], None] | None = None,
) -> MergeStats:
    """Merge ``adapters`` into the checkpoint in ``base``, writing shards to ``out`` (exists).

    ``on_bytes(n)`` reports progress; ``on_file(path)`` is called when a shard is complete.
    """
    t0 = time.perf_counter()
    shards, index = checkpoint_shards(base)
    headers = {s: read_header(base / s) for s in shards}
    by_name: dict = {}
    for s, (ts, _) in headers.items():
        for t in ts:  # one tensor in two shards: which one a loader takes is anyone's guess
            if t.name in by_name:
                raise ModelFormatError(f"{base / s}: tensor {t.name!r} is also in {by_name[t.name][0]}")
            by_name[t.name] = (s, t)
    targets: set[str] = set()
    for adapter in adapters:
        for path in sorted(adapter.weights):
            key = f"{path}.weight"
            if key not in by_name:
                raise AdapterMismatchError(
                    f"target module {path!r}: the checkpoint has no tensor {key!r} "
                    "(is this adapter for another architecture?)"
                )
            if not DTYPES[by_name[key][1].dtype].is_floating_point:
                raise ModelFormatError(
                    f"{base / by_name[key][0]}: tensor {key!r}, which the adapter targets, is stored as "
                    f"{by_name[key][1].dtype}; a merge needs floating-point weights"
                )
            targets.add(key)
        _check_targets(adapter, {name: t for name, (_, t) in by_name.items()})
        for key in adapter.replacements:
            if key not in by_name:
                raise AdapterMismatchError(f"adapter replaces {key!r}, which the checkpoint does not have")
            if list(adapter.replacements[key].shape) != by_name[key][1].shape:
                raise AdapterMismatchError(
                    f"adapter tensor for {key!r} has shape {tuple(adapter.replacements[key].shape)} but the "
                    f"checkpoint's is {tuple(by_name[key][1].shape)}"
                )
            targets.add(key)
    stats = MergeStats("float64", "")
    for shard in shards:
        tensors, meta = headers[shard]
        plan = []
        for t in tensors:
            cast = storage_dtype is not None and DTYPES[t.dtype].is_floating_point
            code = CODES[storage_dtype] if cast else t.dtype
            plan.append(
                (t, t.name in targets or cast, code, t.nbytes // _itemsize(t.dtype) * _itemsize(code))
            )
        with open(base / shard, "rb", buffering=0) as src, open(out / shard, "wb", buffering=0) as dst:
            _write_all(dst, _header_bytes([(t.name, dt, t.shape, nb) for t, _, dt, nb in plan], meta))
            for t, decode, _, _ in plan:
                src.seek(t.start)
                if not decode:
                    _copy_bytes(
                        src, dst, t.start, t.nbytes, f"{base / shard}: truncated in tensor {t.name!r}"
                    )
                    if on_bytes:
                        on_bytes(t.nbytes)
                    continue
                buf = bytearray(t.nbytes)
                if src.readinto(buf) != t.nbytes:
                    raise ModelFormatError(f"{base / shard}: truncated in tensor {t.name!r}")
                w0 = (
                    torch.frombuffer(buf, dtype=DTYPES[t.dtype]).reshape(t.shape)
                    if t.nbytes
                    else torch.empty(t.shape, dtype=DTYPES[t.dtype])
                )
                if t.name in targets:
                    merged, one = merge_state_dict(
                        {t.name: w0},
                        [_restrict(a, t.name) for a in adapters],
                        weights,
                        storage_dtype=storage_dtype,
                    )
                    stats.modules.extend(one.modules)
                    w = merged[t.name]
                else:
                    w = cast_checked(w0, storage_dtype, t.name)
                if w.numel():
                    _write_all(dst, memoryview(w.contiguous().reshape(-1).view(torch.uint8).numpy()))
                if on_bytes:
                    on_bytes(t.nbytes)
        if on_file:
            on_file(out / shard)  # complete: e.g. hashed in the background while the next is merged
    if index is not None:
        (out / INDEX).write_text(json.dumps(index, indent=2))
    for f in base.iterdir():  # config, tokenizer and other small files travel with the weights
        if (
            f.is_file()
            and f.name not in shards
            and f.name not in (INDEX, META)  # the base's manifest describes the base
            and f.suffix not in (".bin", ".pt", ".pth")
        ):
            shutil.copy2(f, out / f.name)
    dtypes = {DTYPES[t.dtype] for ts, _ in headers.values() for t in ts if DTYPES[t.dtype].is_floating_point}
    stats.storage_dtype = str(storage_dtype or (dtypes.pop() if len(dtypes) == 1 else "mixed")).removeprefix(
        "torch."
    )
    stats.seconds = time.perf_counter() - t0
    return stats


def _check_targets(adapter: Adapter, tensors: dict[str, TensorInfo]) -> None:
    """What ``Adapter.check_fits`` checks against a model, from the checkpoint's tensor names: the
    adapter holds tensors for exactly the modules its config targets (2-D ``<module>.weight``)."""
    modules = {
        n.removesuffix(".weight") for n, t in tensors.items() if n.endswith(".weight") and len(t.shape) == 2
    }
    adapter.check_targets({m for m in modules if adapter.config.matches(m)})


def _write_all(dst, data) -> None:
    """Unbuffered writes may be partial (a single write(2) stops short of 2 GiB): loop."""
    view = memoryview(data).cast("B")
    while view:
        n = dst.write(view)
        view = view[n:]


def _copy_bytes(src, dst, offset: int, count: int, truncated: str) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to ``dst``'s position, in the kernel when it
    can (copy_file_range: no user-space buffer), else in chunks."""
    left = count
    try:
        while left:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), offset + count - left)
            if n == 0:
                raise ModelFormatError(truncated)
            left -= n
        return
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (
            errno.EXDEV,
            errno.ENOSYS,
            errno.EINVAL,
            errno.EOPNOTSUPP,
        ):
            raise
    src.seek(offset + count - left)
    while left:
        chunk = src.read(min(COPY_CHUNK, left))
        if not chunk:
            raise ModelFormatError(truncated)
        _write_all(dst, chunk)
        left -= len(chunk)


def _restrict(adapter: Adapter, key: str) -> Adapter:
    """The part of ``adapter`` that touches tensor ``key`` (so merge_state_dict sees one tensor and
    sums the adapters in the same order as the in-memory merge: bit-identical results)."""
    path = key.removesuffix(".weight")
    lora = {path: adapter.weights[path]} if key.endswith(".weight") and path in adapter.weights else {}
    repl = {key: adapter.replacements[key]} if key in adapter.replacements else {}
    mags = {p: adapter.magnitudes[p] for p in lora if p in adapter.magnitudes}
    return Adapter(adapter.config, lora, adapter.path, repl, mags)
