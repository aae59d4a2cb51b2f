"""Output integrity: ``loraexport.json`` lists the sha256 of every file an output holds.

Every command writes its output through ``io.atomic_output_dir``, which calls
``write_manifest`` on the finished temporary folder just before renaming it into place, so
every output directory carries the digests of exactly what was written.
``loraexport verify --check-files DIR`` re-reads them (``check_manifest``).

Large files may be hashed while the command still works (``Hasher``: a background thread;
hashlib releases the GIL), so a multi-GB merge does not pay for a second pass at the end.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loraexport.errors import InvalidInputError, ModelFormatError

MANIFEST = "loraexport.json"


def _sha256(path: Path) -> str:
    from loraexport.io import sha256_file

    return sha256_file(path)


class Hasher:
    """Hash finished files in the background: ``submit(path)`` now, ``digests()`` at the end."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraexport-sha256")
        self._jobs: dict[Path, Future[str]] = {}

    def submit(self, path: Path) -> None:
        self._jobs[Path(path)] = self._pool.submit(_sha256, Path(path))

    def digests(self) -> dict[Path, str]:
        try:
            return {p: f.result() for p, f in self._jobs.items()}
        finally:
            self._pool.shutdown(wait=True)

    def cancel(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _files(directory: Path, links: bool = False) -> list[Path]:
    """Regular files under ``directory`` (links too with ``links``: reported, never hashed)."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.name != MANIFEST and ((p.is_file() and not p.is_symlink()) or (links and p.is_symlink()))
    )


def write_manifest(directory: Path, known: dict[Path, str] | None = None) -> dict[str, str]:
    """Add ``"files": {relative path: sha256}`` for every file in ``directory`` to its manifest.

    ``known`` holds digests already computed (by a ``Hasher``) for files that have not changed
    since. Keeps whatever else ``loraexport.json`` already holds (export metadata).
    """
    path = directory / MANIFEST
    meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    known = {Path(k).resolve(): v for k, v in (known or {}).items()}
    meta["files"] = {
        p.relative_to(directory).as_posix(): known.get(p.resolve()) or _sha256(p) for p in _files(directory)
    }
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta["files"]


@dataclass
class ManifestCheck:
    directory: Path
    checked: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # present, not in the manifest: reported only

    @property
    def ok(self) -> bool:
        return not self.changed and not self.missing


def check_manifest(directory: str | Path) -> ManifestCheck:
    """Re-hash every file ``directory/loraexport.json`` lists; report the changed and missing ones."""
    from loraexport.io import read_json, require_dir

    d = require_dir(directory, "output directory")
    meta = read_json(d / MANIFEST, ModelFormatError)
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ModelFormatError(f'{d / MANIFEST} has no "files" table of sha256 digests')
    result = ManifestCheck(d)
    root = d.resolve()
    for rel, digest in sorted(files.items()):
        try:
            p = (d / rel).resolve()
        except (ValueError, OSError) as e:  # a NUL byte, a name too long, a loop of links
            raise InvalidInputError(f"{d / MANIFEST} lists {rel!r}, which is not a usable path ({e})") from e
        if root not in p.parents:
            raise InvalidInputError(f"{d / MANIFEST} lists {rel!r}, which is outside {d}")
        if not p.is_file():
            result.missing.append(rel)
            continue
        result.checked += 1
        if _sha256(p) != digest:
            result.changed.append(rel)
    present = (p.relative_to(d).as_posix() for p in _files(d, links=True))
    result.unlisted = [rel for rel in present if rel not in files]
    return result
