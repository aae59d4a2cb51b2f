"""onnxruntime sessions for an export: the options loraexport runs them with, one opened after
its file is checked (``open_session``), and what onnxruntime raises, said as a
``RuntimeInputError`` (``ORT_ERRORS``, ``translated``). onnxruntime and the standard library only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from loraexport.errors import InvalidInputError, first_line
from loraexport.runtime.files import RuntimeInputError, check_external_data

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# What onnxruntime raises for a model it cannot load or run (bad graph, bad protobuf, missing
# data, inputs that do not fit...).
ORT_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("Fail", "InvalidGraph", "InvalidArgument", "NoSuchFile", "InvalidProtobuf", "NotImplemented")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)
# onnxruntime's own severities: 0 verbose … 3 error, 4 fatal. Its errors reach loraexport as
# exceptions (one line each); logged as well, they would print a coloured copy on fd 2 first.
_ORT_FATAL_ONLY = 4


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """Fixed thread counts; ``spinning``: onnxruntime's threads spin between runs, waiting for
    the next one (its own default: an app decoding token after token gains from it). Off (the
    default here) for a harness that runs onnxruntime and torch in turn on the same cores, where a
    spinning thread takes the core the other side needs: verification, latency, ``make bench``.

    onnxruntime logs only fatal errors: every error it has also raises, and loraexport says
    it in one line (the log would print a second, ANSI-coloured copy on stderr first).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = _ORT_FATAL_ONLY
    return so


def open_session(
    path: str | Path, provider: str = "cpu", threads: int | None = None, spinning: bool = False
) -> ort.InferenceSession:
    p = Path(path)
    if provider not in PROVIDERS:
        raise RuntimeInputError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise RuntimeInputError(f"onnxruntime has no {PROVIDERS[provider]} on this machine")
    check_external_data(p)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        options = session_options(threads, spinning)
        return ort.InferenceSession(str(p), sess_options=options, providers=providers)
    except ORT_ERRORS as e:
        raise RuntimeInputError(f"onnxruntime cannot load {p}: {first_line(e)}") from e


def translated(fn: Callable, *args):
    """``fn(*args)`` (a decoding loop, ``runtime.decode``); what it refuses, and what onnxruntime
    cannot run, is a ``RuntimeInputError``."""
    try:
        return fn(*args)
    except InvalidInputError as e:
        if isinstance(e, RuntimeInputError):
            raise
        raise RuntimeInputError(str(e)) from e
    except ORT_ERRORS as e:
        raise RuntimeInputError(f"onnxruntime cannot run this graph: {first_line(e)}") from e
