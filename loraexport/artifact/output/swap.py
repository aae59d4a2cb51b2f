"""The final move of an output into place: atomic, and never over what it was not told to replace.

``renameat2`` (Linux): ``RENAME_NOREPLACE`` when nothing was at the target, so anything that
appeared meanwhile (another run, another program) is never removed; ``RENAME_EXCHANGE`` when a
previous output is replaced, after which what was swapped out is removed only if it is the very
entry that was planned (device, inode, change time). Elsewhere a portable fallback keeps the
rules with a narrow window between its check and its rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import signal
from pathlib import Path

from loraexport.errors import OutputTakenError

# Held back while the output is swapped in, and delivered right after (SIGHUP: a closed terminal).
DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
# (st_dev, st_ino, st_ctime_ns): inode numbers are reused at once on ext4, and the change time
# moves whenever anything is added to, removed from or renamed in the folder.
Identity = tuple[int, int, int]
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def identity(p: Path) -> Identity:
    st = os.lstat(p)
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _libc_renameat2() if os.uname().sysname == "Linux" else None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it."""
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, failing with ``FileExistsError`` if anything is at ``dst``."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from e
        raise
    if os.path.lexists(dst):  # no renameat2 here: a narrow window remains between check and rename
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def remove(p: Path) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def taken(label: str, target: Path) -> OutputTakenError:
    return OutputTakenError(
        f"{label} {target} was created or replaced by someone else while this run worked; "
        "it was left alone and this run's output discarded"
    )


def swap_in(new: Path, target: Path, replaces: Identity | None, label: str) -> None:
    """Put ``new`` at ``target``: where nothing was planned to be replaced, only if nothing is
    there; else only if what is there is still the entry planned (its identity)."""
    if replaces is None or not os.path.lexists(target):
        try:
            rename_noreplace(new, target)
        except FileExistsError as e:
            raise taken(label, target) from e
        return
    if identity(target) != replaces:  # changed since it was planned: not what we were told to replace
        raise taken(label, target)
    try:
        exchanged = _renameat2(new, target, _RENAME_EXCHANGE)
    except FileNotFoundError:  # removed meanwhile: nothing to replace
        exchanged = False
    if exchanged:  # ``new`` now names the previous entry (a rename moves its change time: not compared)
        if identity(new)[:2] != replaces[:2]:
            _renameat2(new, target, _RENAME_EXCHANGE)  # put the stranger back
            raise taken(label, target)
        remove(new)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, old)
    if identity(old)[:2] != replaces[:2]:
        with contextlib.suppress(OSError):
            rename_noreplace(old, target)
        raise taken(label, target)
    try:
        rename_noreplace(new, target)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(old, target)
        raise
    remove(old)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP until the block is done (they are delivered right after)."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not on POSIX
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
