"""Output integrity: ``loraexport.json`` lists the sha256 of every file an output holds.

Every command writes its output through ``output.write_output``, which has
``provenance.write`` list the finished temporary folder's files just before renaming it into
place, so every output directory carries the digests of exactly what was written. This module
holds the hashing (``Hasher``, ``files_in``) and the other side: ``loraexport verify
--check-files DIR`` re-reads them (``check_manifest``, ``check_files``).

Large files may be hashed while the command still works (``Hasher``: a background thread;
hashlib releases the GIL), so a multi-GB merge does not pay for a second pass at the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loraexport.artifact.schema import META, graph_files
from loraexport.core.untrusted import short_repr
from loraexport.errors import InvalidInputError, ModelFormatError, VerificationFailedError

MANIFEST = META  # the manifest is loraexport.json itself
# loraexport.json's digest of its own content (every other key, canonical JSON): its claims are
# checked like the files it lists.
SELF_DIGEST = "sha256"
_CHUNK = 1 << 20
# open() errors that mean a path is no longer what was written: a link (O_NOFOLLOW), a file
# where a folder was.
_NOT_AS_WRITTEN = (errno.ELOOP, errno.ENOTDIR)


def description_digest(meta: dict) -> str:
    """The sha256 of ``meta`` without its own digest, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in meta.items() if k != SELF_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_description(meta: object) -> str:
    """``ok`` when ``meta`` (a parsed loraexport.json) carries its own digest and it matches;
    else what is wrong, in words."""
    if not isinstance(meta, dict) or not isinstance(meta.get(SELF_DIGEST), str):
        return "carries no digest of its own (edited, or written by an older loraexport): export again"
    try:
        digest = description_digest(meta)
    except ValueError:  # a NaN or infinity: no JSON canonical form, so not what was written
        return "holds a value JSON cannot carry: edited after it was written"
    if digest != meta[SELF_DIGEST]:
        return "edited after it was written (its own sha256 differs)"
    return "ok"


def sha256(path: Path) -> str:
    from loraexport.core.io import sha256_file

    return sha256_file(path)


class Hasher:
    """Hash finished files in the background: ``submit(path)`` now, ``digests()`` at the end."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraexport-sha256")
        self._jobs: dict[Path, Future[str]] = {}

    def submit(self, path: Path) -> None:
        self._jobs[Path(path)] = self._pool.submit(sha256, Path(path))

    def digests(self) -> dict[Path, str]:
        try:
            return {p: f.result() for p, f in self._jobs.items()}
        finally:
            self._pool.shutdown(wait=True)

    def cancel(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _entries(directory: Path) -> list[tuple[str, bool]]:
    """``(relative path, is a regular file)`` for everything under ``directory`` but folders and
    the manifest, sorted; links (to folders too) are listed, never followed."""
    found: list[tuple[str, bool]] = []
    todo = [(directory, "")]  # a stack, not recursion: a hostile tree may nest thousands deep
    while todo:
        d, prefix = todo.pop()
        with os.scandir(d) as it:
            for entry in it:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    todo.append((Path(entry.path), rel + "/"))
                elif rel != MANIFEST:
                    found.append((rel, entry.is_file(follow_symlinks=False)))
    return sorted(found)


def files_in(directory: Path) -> list[Path]:
    """Regular files under ``directory``: what a manifest lists (links are never hashed)."""
    return [directory / rel for rel, regular in _entries(directory) if regular]


@dataclass
class ManifestCheck:
    directory: Path
    checked: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # present, not in the manifest: reported only
    description: str = "ok"  # loraexport.json's own digest (``check_description``)

    @property
    def ok(self) -> bool:
        return not self.changed and not self.missing and self.description == "ok"

    def to_json(self) -> dict:
        keys = ("checked", "changed", "missing", "unlisted", "description")
        return {"directory": str(self.directory), "ok": self.ok} | {k: getattr(self, k) for k in keys}


def check_files(directory: str | Path) -> ManifestCheck:
    """``verify --check-files``: the check, and ``VerificationFailedError`` (exit 4, with the
    check as ``.report``) naming the changed and missing files when any is."""
    result = check_manifest(directory)
    if not result.ok:
        what = [f"changed: {', '.join(result.changed)}"] * bool(result.changed)
        what += [f"missing: {', '.join(result.missing)}"] * bool(result.missing)
        what += [f"loraexport.json {result.description}"] * (result.description != "ok")
        raise VerificationFailedError(
            f"{directory}: files do not match loraexport.json ({'; '.join(what)})", result
        )
    return result


def _listed_path(manifest: Path, rel: object) -> list[str]:
    """The components of a path the manifest lists; an absolute one, one with ``..``, an empty
    or unusable one makes the manifest invalid (it may only name files inside its folder)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise InvalidInputError(f"{manifest} lists {short_repr(rel)}, which is not a usable path")
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts:
        raise InvalidInputError(f"{manifest} lists {short_repr(rel)}, which is outside {manifest.parent}")
    if any(part in ("", ".") for part in parts):
        raise InvalidInputError(f"{manifest} lists {short_repr(rel)}, which is not a usable path")
    return parts


def _digest_unfollowed(root_fd: int, parts: list[str]) -> str | None:
    """The sha256 of the regular file at ``parts`` under the folder ``root_fd``, or None if it is
    missing; ``_Changed`` if any component is a link, or the file is not a regular file.

    No link is followed: every folder on the way is opened with ``O_NOFOLLOW`` relative to the
    previous one, the file is lstat-ed, then opened ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO swapped in
    meanwhile cannot block) and checked again on the open descriptor.
    """
    fd = root_fd
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno in _NOT_AS_WRITTEN:
                    raise _Changed from e
                raise
            if fd != root_fd:
                os.close(fd)
            fd = nxt
        try:
            st = os.lstat(parts[-1], dir_fd=fd)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise _Changed
        try:
            f = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in _NOT_AS_WRITTEN:  # replaced by a link since the lstat
                raise _Changed from e
            raise
        with open(f, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise _Changed
            h = hashlib.sha256()
            while block := stream.read(_CHUNK):
                h.update(block)
            return h.hexdigest()
    finally:
        if fd != root_fd:
            os.close(fd)


class _Changed(Exception):
    """A listed path that is now a link, a folder, a FIFO... anything but the file written."""


def check_manifest(directory: str | Path) -> ManifestCheck:
    """Re-hash every file ``directory/loraexport.json`` lists; report the changed and missing ones.

    Nothing is followed: a listed file replaced by a link (wherever it leads), a folder or a FIFO
    is *changed*. A manifest that lists a path outside ``directory`` is invalid (exit 3).
    """
    from loraexport.core.io import read_json, require_dir

    d = require_dir(directory, "output directory")
    manifest = d / MANIFEST
    if os.path.islink(manifest):
        raise ModelFormatError(f"{manifest} is a symbolic link; a manifest must be the file written there")
    meta = read_json(manifest, ModelFormatError)
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ModelFormatError(f'{manifest} has no "files" table of sha256 digests')
    listed = {rel: _listed_path(manifest, rel) for rel in sorted(files)}  # all checked before any work
    result = ManifestCheck(d, description=check_description(meta))
    try:
        root_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise InvalidInputError(f"output directory cannot be read: {d} ({e.strerror})") from e
    try:
        for rel, parts in listed.items():
            try:
                digest = _digest_unfollowed(root_fd, parts)
            except _Changed:
                result.changed.append(rel)
                continue
            except OSError as e:  # unreadable (permissions, an I/O error): cannot be checked at all
                raise InvalidInputError(f"{d / rel} cannot be read ({e.strerror or e})") from e
            if digest is None:
                result.missing.append(rel)
                continue
            result.checked += 1
            if digest != files[rel]:
                result.changed.append(rel)
    finally:
        os.close(root_fd)
    try:
        result.unlisted = [rel for rel, _ in _entries(d) if rel not in files]
    except OSError as e:  # a folder inside that cannot be listed
        raise InvalidInputError(f"{d}: cannot list {e.filename} ({e.strerror})") from e
    graphs = [g for g in graph_files(meta) if g in result.unlisted or f"{g}.data" in result.unlisted]
    if graphs and result.description == "ok":  # a table that lists nothing checks nothing
        result.description = f"lists no sha256 for {graphs[0]}, a graph of the export"
    return result
