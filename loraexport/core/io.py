"""File helpers shared by every stage: input paths, JSON, safetensors and hashes.

Outputs (checks against inputs, temporary folders, the final swap) live in ``artifact.output``."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loraexport.core.untrusted import parse_json, read_json, short_repr  # noqa: F401 (re-exported)
from loraexport.errors import InputNotFoundError, InvalidInputError


def _stat_problem(p: Path) -> str | None:
    """Why ``p`` cannot be looked at (a name too long, a loop of links...), or None."""
    try:
        p.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        return getattr(e, "strerror", None) or str(e)
    return None


def require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if problem := _stat_problem(p):
        raise InputNotFoundError(f"{what} cannot be read: {p} ({problem})")
    if not p.exists():
        raise InputNotFoundError(f"{what} not found: {p}")
    if not p.is_dir():
        raise InputNotFoundError(f"{what} must be a directory: {p}")
    if not os.access(p, os.R_OK | os.X_OK):
        raise InputNotFoundError(f"{what} is not readable: {p}")
    return p


def require_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if problem := _stat_problem(p):
        raise InputNotFoundError(f"{what} cannot be read: {p} ({problem})")
    if not p.exists():
        raise InputNotFoundError(f"{what} not found: {p}")
    if not p.is_file():  # a directory, a FIFO, a device (/dev/zero): never opened
        raise InputNotFoundError(f"{what} must be a regular file: {p} is {_file_kind(p)}")
    if not os.access(p, os.R_OK):
        raise InputNotFoundError(f"{what} is not readable: {p}")
    return p


def _file_kind(p: Path) -> str:
    for test, kind in (
        (p.is_dir, "a directory"),
        (p.is_fifo, "a FIFO"),
        (p.is_char_device, "a character device"),
        (p.is_block_device, "a block device"),
        (p.is_socket, "a socket"),
    ):
        if test():
            return kind
    return "not a regular file"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def load_safetensors(path: Path, error: type[InvalidInputError]) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file raises ``error``."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path}: not a readable safetensors file ({e})") from e


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def sha256_file(path: Path, chunk: int = 1 << 20, stop: threading.Event | None = None) -> str:
    """``path``'s sha256; ``stop``: set by another thread, the reading ends (``Cancelled``)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                if stop is not None and stop.is_set():
                    raise Cancelled(f"hashing {path} stopped")
                h.update(block)
    except OSError as e:
        raise InputNotFoundError(f"cannot read {path}: {e.strerror or e}") from e
    return h.hexdigest()


def sha256_dir(path: Path, stop: threading.Event | None = None) -> str:
    """One digest over every file in a directory (names and contents, sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f, stop=stop).encode())
    return h.hexdigest()


class Cancelled(Exception):
    """A background read stopped because its result is no longer wanted."""


class DirDigest:
    """``sha256_dir(path)`` computed in a thread while the caller works: hashlib hashes without the
    GIL, so on a machine with a core to spare the digest costs no wall time. ``result()`` waits for
    it (and raises what hashing raised); ``cancel()`` stops it at the next chunk, for a caller that
    failed and will not ask. A context manager: leaving it cancels what was not asked for."""

    def __init__(self, path: Path):
        self._stop = threading.Event()
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(Path(path),), name="sha256", daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._digest = sha256_dir(path, self._stop)
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> DirDigest:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
