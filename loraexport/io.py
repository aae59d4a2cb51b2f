"""File helpers shared by every stage: JSON, safetensors, hashes and atomic output dirs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loraexport.errors import (
    InputNotFoundError,
    InvalidInputError,
    OutputExistsError,
    OutputNotWritableError,
)
from loraexport.manifest import Hasher, write_manifest
from loraexport.untrusted import parse_json, read_json, short_repr  # noqa: F401 (re-exported)


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
    if not p.is_file():
        raise InputNotFoundError(f"{what} not found: {p}")
    if not os.access(p, os.R_OK):
        raise InputNotFoundError(f"{what} is not readable: {p}")
    return p


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:
        raise InputNotFoundError(f"cannot read {path}: {e.strerror or e}") from e
    return h.hexdigest()


def sha256_dir(path: Path) -> str:
    """One digest over every file in a directory (names and contents, sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def check_output(path: str | Path, force: bool) -> Path:
    """Refuse an existing output unless ``force``; check its parent can be written."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputExistsError(f"output exists: {p} (pass --force to replace it)")
    parent = p.absolute().parent
    while not parent.exists():  # missing parents are created; the first existing one must be writable
        parent = parent.parent
    if not parent.is_dir():
        raise OutputNotWritableError(f"output's parent is not a directory: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot write to {parent} (permission denied)")
    return p


def _inside(path: Path, places: tuple[Path, ...]) -> bool:
    """``path`` is one of ``places`` (the output, its temporary folder, its parent) or in the
    first two: a permission error there is the output's."""
    p = path.absolute()
    return any(p == q.absolute() for q in places) or any(q.absolute() in p.parents for q in places[:2])


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block is done (they are delivered right after)."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not on POSIX
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, force: bool = False, hasher: Hasher | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; rename it to ``path`` only on success.

    On success, ``loraexport.json`` in the folder gets the sha256 of every file in it
    (``manifest.write_manifest``; files given to ``hasher`` were hashed while the work ran).
    On any exception (including KeyboardInterrupt) the temporary folder is removed and the
    previous ``path``, if any, is left exactly as it was. A full disk becomes
    ``OutputNotWritableError``.
    """
    final = check_output(path, force)
    try:
        final.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputNotWritableError(f"cannot create {final.absolute().parent}: {e.strerror}") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.absolute().parent))
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    written = False
    try:
        yield tmp
        write_manifest(tmp, hasher.digests() if hasher else None)
        if final.exists():
            with _signals_deferred():  # Ctrl-C between the two renames must not lose the old output
                os.replace(final, old)
                try:
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(old, final)
                    raise
                written = True
            shutil.rmtree(old, ignore_errors=True)
        else:
            with _signals_deferred():  # so that "written" is true exactly when the output is there
                os.replace(tmp, final)
                written = True
    except OSError as e:
        if hasher:
            hasher.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputNotWritableError(f"no space left on device while writing {final}") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            name = e.filename if isinstance(e.filename, str) else None
            if name and not _inside(Path(name), (tmp, final, final.absolute().parent)):
                raise InputNotFoundError(f"cannot read {name}: {e.strerror}") from e  # an input's fault
            raise OutputNotWritableError(f"cannot write {final}: {e.strerror}") from e
        raise
    except BaseException as e:
        if hasher:
            hasher.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        if written:  # a signal held back during the swap arrived once it was done: the output is whole
            shutil.rmtree(old, ignore_errors=True)
            e.loraexport_written = str(final)
        raise
