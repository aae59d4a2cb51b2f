"""torch → ONNX with the dynamo exporter: named I/O, dynamic axes, external data, checker.

The exporter's own console output and warnings are captured — Python's ``print`` and
warnings, and what its C++ half writes straight to file descriptors 1 and 2 (TorchScript
prints its whole IR graph there when it fails) — into ``ExportResult.exporter_log``, which
the CLI shows with ``--verbose``. Weights go to ``<name>.onnx.data`` (external data) when a
graph's weights exceed ``EXTERNAL_DATA_BYTES``, below protobuf's 2 GiB limit.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import onnx
import torch

from loraexport.artifact.schema import EXPORTERS
from loraexport.errors import ExportError, InvalidInputError, first_line
from loraexport.models.spec import GraphSpec

DEFAULT_OPSET = 18
# The opsets each exporter writes as asked, and onnxruntime loads (1.32: "official support for
# domain ai.onnx is till opset 28"); anything else is refused before exporting.
MIN_OPSET = 18  # the dynamo exporter's translation table (torchlib) starts at opset 18
MAX_OPSETS = {
    # onnxscript converts the graph up to 25 itself, up to onnx's newest (onnx 1.23: 28) through
    # onnx's converter, and above that silently writes opset 18.
    "dynamo": 28,
    # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET: above it torch warns "not
    # supported"; from 24 it fails, printing its IR graph.
    "torchscript": 20,
}
MAX_OPSET = max(MAX_OPSETS.values())  # for a command-line option; each exporter has its own
EXTERNAL_DATA_BYTES = 1_800_000_000  # leave headroom under protobuf's 2 GiB message limit
# What is kept of the exporter's console output (the end, where failures are said).
MAX_EXPORTER_LOG_BYTES = 1 << 20

log = logging.getLogger(__name__)


def check_opset(opset: int, exporter: str) -> None:
    """Refuse (``InvalidInputError``) an opset ``exporter`` cannot write as asked."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    top = MAX_OPSETS[exporter]
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= top:
        best = "" if exporter == "dynamo" else f" (the dynamo exporter writes up to {MAX_OPSETS['dynamo']})"
        raise InvalidInputError(
            f"opset {opset!r} is not one the {exporter} exporter writes: choose {MIN_OPSET} to {top}{best}"
        )


def _flush_all() -> None:
    """Flush Python's streams and C's stdio buffers, so what was written lands on the fd it was
    written for (before or after the fds are swapped)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):  # closed, detached or replaced by a test runner
            stream.flush()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _fd_output_to(captured: io.StringIO, scratch: Path) -> Iterator[None]:
    """While the block runs, fds 1 and 2 write to an unlinked file in ``scratch``; its end
    (``MAX_EXPORTER_LOG_BYTES``) goes to ``captured`` afterwards. The fds are put back whatever
    ends the block, a KeyboardInterrupt (or SIGTERM) during the restoring included."""
    _flush_all()
    saved: dict[int, int] = {}
    with tempfile.TemporaryFile(dir=scratch, prefix=".exporter-output-") as sink:
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):  # not open (a daemon): nothing to capture
                    saved[fd] = os.dup(fd)
                    os.dup2(sink.fileno(), fd)
            yield
        finally:
            _restore_fds(saved)
            captured.write(_tail(sink))


def _restore_fds(saved: dict[int, int]) -> None:
    interrupted = None
    while True:
        try:
            _flush_all()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
            break
        except KeyboardInterrupt as e:  # Ctrl-C now would leave the terminal's fds lost: finish
            interrupted = e
    for copy in saved.values():
        os.close(copy)
    if interrupted is not None:
        raise interrupted


def _tail(f: BinaryIO) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - MAX_EXPORTER_LOG_BYTES))
    return f.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def _exporter_quiet(captured: io.StringIO, scratch: Path) -> Iterator[None]:
    """Capture the exporter's prints, fd output, log records written to stderr and warnings.

    ``scratch``: a folder for the (unlinked, never visible) file that holds the fd output. The
    CLI prints what was captured with ``--verbose`` (``ExportResult.exporter_log``).
    """
    with (
        _fd_output_to(captured, scratch),
        contextlib.redirect_stdout(captured),
        contextlib.redirect_stderr(captured),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


@dataclass
class ExportResult:
    files: list[str] = field(default_factory=list)  # relative to the output dir
    opset: int = DEFAULT_OPSET
    seconds: float = 0.0
    bytes: int = 0
    inputs: dict[str, list[str]] = field(default_factory=dict)  # per graph
    outputs: dict[str, list[str]] = field(default_factory=dict)
    exporter_log: str = ""
    exporter: str = "dynamo"
    # --optimize (export.optimize): per graph, how it differs ({"logits": "last", "kv_cache":
    # "shared-buffer"}), and what was done, for loraexport.json and the report
    layouts: dict[str, dict[str, str]] = field(default_factory=dict)
    optimized: dict = field(default_factory=dict)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _flat_dynamic_shapes(spec: GraphSpec) -> list[dict]:
    """``dynamic_shapes`` (named args, then a tuple for ``*caches``) as one dict per input name."""
    flat: list[dict] = []
    for entry in spec.dynamic_shapes:
        flat.extend(entry if isinstance(entry, tuple) else [entry])
    return flat


def _torchscript_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` for the TorchScript exporter: the inputs' Dims by name; every output axis
    but the last dynamic (their sizes follow from the inputs)."""
    axes = {
        n: {a: d.__name__ for a, d in dims.items()}
        for n, dims in zip(spec.input_names, _flat_dynamic_shapes(spec), strict=True)
    }
    with torch.no_grad():
        outs = spec.module(*spec.args)
    for name, out in zip(spec.output_names, outs, strict=True):
        axes[name] = {a: f"{name}_{a}" for a in range(out.ndim - 1)}
    return axes


def _export_one(spec: GraphSpec, path: Path, opset: int, exporter: str, external: bool) -> None:
    if exporter == "dynamo":
        program = torch.onnx.export(
            spec.module.eval(),
            spec.args,
            None,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=external)
        return
    scratch = path.parent / f".{path.stem}-export"  # the tracer may write one file per tensor here
    if external:
        scratch.mkdir(exist_ok=True)
    target = scratch / path.name if external else path
    torch.onnx.export(
        spec.module.eval(),
        spec.args,
        str(target),
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=_torchscript_axes(spec),
        opset_version=opset,
        dynamo=False,
        do_constant_folding=True,
    )
    if external:  # gather the weights into one <name>.onnx.data beside <name>.onnx
        model = onnx.load(str(target))
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
        del model
        shutil.rmtree(scratch)


def _disk_error(e: BaseException, out_dir: Path) -> OSError | None:
    """The OSError in ``e``'s chain of causes that is the output's: a full or over-quota disk,
    or a read-only / permission error on a file under ``out_dir``; else None."""
    seen = set()
    root = out_dir.resolve()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return e
            name = e.filename if isinstance(e.filename, str) else None
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and name:
                target = Path(name).resolve()
                if target == root or root in target.parents:
                    return e
        e = e.__cause__ or e.__context__
    return None


def _varint(f: BinaryIO) -> int:
    value = shift = 0
    while True:
        b = f.read(1)
        if not b or shift > 63:
            raise ValueError("truncated or overlong varint")
        value |= (b[0] & 0x7F) << shift
        shift += 7
        if b[0] < 0x80:
            return value


def _fields(f: BinaryIO, end: int, keep: int) -> Iterator[tuple[int, int | bytes]]:
    """``(field number, value)`` of a protobuf message in ``f`` up to offset ``end``: varints
    as ints, length-delimited field ``keep`` as bytes; all else is skipped over, not read."""
    while f.tell() < end:
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, _varint(f)
        elif wire in (1, 5):  # fixed 64 / 32 bits
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        elif wire == 2:
            n = _varint(f)
            if number == keep:
                yield number, f.read(n)
            else:
                f.seek(n, os.SEEK_CUR)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")


_OPSET_IMPORT = 8  # ModelProto.opset_import: OperatorSetIdProto {domain = 1, version = 2}


def opset_written(path: Path) -> int | None:
    """The default domain's opset in ``path``'s ``opset_import`` (None if it names none), read
    from the protobuf's top-level fields alone: the graph (up to 2 GB) is skipped, not read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for number, raw in _fields(f, size, keep=_OPSET_IMPORT):
            if number != _OPSET_IMPORT or not isinstance(raw, bytes):
                continue
            entry = dict(_fields(io.BytesIO(raw), len(raw), keep=1))
            domain = entry.get(1, b"")
            if domain in (b"", b"ai.onnx") and isinstance(entry.get(2), int):
                return entry[2]
    return None


def export_graphs(
    specs: list[GraphSpec], out_dir: Path, opset: int = DEFAULT_OPSET, exporter: str = "dynamo"
) -> ExportResult:
    """Export each spec to ``out_dir/<name>.onnx`` and check it with ``onnx.checker``.

    ``exporter``: ``dynamo`` (torch.export; smaller graphs, the maintained path) or
    ``torchscript`` (the older tracer; 5-10x faster to export: on SmolLM2-135M 19 s against
    135 s measured here, which is what makes a 120 s merge-and-export of that model possible).
    """
    check_opset(opset, exporter)
    result = ExportResult(opset=opset, exporter=exporter)
    t0 = time.perf_counter()
    captured = io.StringIO()
    for spec in specs:
        path = out_dir / f"{spec.name}.onnx"
        external = _param_bytes(spec.module) > EXTERNAL_DATA_BYTES
        try:
            with _exporter_quiet(captured, out_dir), torch.no_grad():
                _export_one(spec, path, opset, exporter, external)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # the exporter raises many types; keep its message
            log.debug("exporter output:\n%s", captured.getvalue())
            disk = _disk_error(e, out_dir)
            if disk is not None:  # a full or read-only disk: the output's problem, said by atomic_output_dir
                raise disk  # noqa: B904 (disk is already in the chain of e; "from" could make a cycle)
            first = first_line(e)
            raise ExportError(f"torch.onnx.export failed for {spec.name}: {first}") from e
        try:
            onnx.checker.check_model(str(path), full_check=False)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{path.name} fails onnx.checker: {first_line(e)}") from e
        try:
            written = opset_written(path)
        except ValueError as e:
            raise ExportError(f"{path.name}: cannot read its opset back ({e})") from e
        if written != opset:  # e.g. the dynamo exporter writes 18 when it cannot convert
            raise ExportError(f"{path.name}: opset {opset} was asked for, the exporter wrote opset {written}")
        result.opset = written  # what the files hold, not what was asked
        result.files.append(path.name)
        if external:
            result.files.append(f"{path.name}.data")
        result.inputs[spec.name] = list(spec.input_names)
        result.outputs[spec.name] = list(spec.output_names)
    result.seconds = time.perf_counter() - t0
    result.bytes = sum((out_dir / f).stat().st_size for f in result.files)
    result.exporter_log = captured.getvalue()
    log.debug("exporter output:\n%s", result.exporter_log)
    return result
