"""Reading files a user hands us, bounded: JSON with a size cap, JSON Lines with a line cap.

Every config, description and data file is untrusted: it may be gigabytes (a sparse file costs
nothing to make), nested thousands deep, hold numbers with thousands of digits or bytes that
are not UTF-8. What is read into memory is capped *before* it is read, and every way parsing
fails becomes the caller's error class with one line naming the file. No torch here: the
app-facing ``loraexport.runtime`` uses it too.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Configs, adapter configs, export descriptions, reports and safetensors indexes. The largest
# real ones are far below: a model.safetensors.index.json for a 405B model is ~2 MB, a
# tokenizer_config.json with a long chat template ~200 kB.
MAX_JSON_BYTES = 8 * 1024 * 1024
# One example of training or evaluation data (JSON Lines): ~250k tokens of text, far more
# than any model's context.
MAX_LINE_BYTES = 4 * 1024 * 1024

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 40, 8, 8


def short_repr(value: object) -> str:
    """``repr`` cut short, for quoting values from untrusted files in one-line error messages
    (a hostile file may nest values thousands deep or hold megabyte strings)."""
    return _REPR.repr(value)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n:,} bytes"


def parse_json(raw: bytes, where: str, error: type[Exception]) -> Any:
    """Parse UTF-8 JSON bytes; anything that is not valid JSON raises ``error`` naming ``where``.

    Besides syntax errors this covers what ``json.loads`` raises on hostile input: bytes that
    are not UTF-8, nesting deep enough to exhaust the stack, integers over Python's digit limit.
    """
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{where}: not valid JSON (not UTF-8: byte {e.start} is {raw[e.start]:#04x})") from e
    except RecursionError as e:
        raise error(f"{where}: not valid JSON (nested too deeply)") from e
    except ValueError as e:  # JSONDecodeError, or an integer literal over the digit limit
        reason = str(e).split(";")[0].splitlines()[0]
        raise error(f"{where}: not valid JSON ({reason})") from e


def text_only(value: Any, where: str, error: type[Exception]) -> Any:
    """``value`` (parsed JSON) if each string in it is text: JSON's ``\\ud800`` escapes decode to a
    lone surrogate, which no tokenizer or UTF-8 writer takes; ``error`` naming ``where`` else."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                code = ord(v[e.start])
                raise error(f"{where}: a lone surrogate (\\u{code:04x}) in a string: not text") from e
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v
    return value


def read_bounded(path: Path, error: type[Exception], limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; the size is checked before
    reading, and no more than ``limit + 1`` bytes are ever read (the file may grow meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise error(f"{path.name} not found in {path.parent}") from e
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from e
    if not os.path.isfile(path):
        raise error(f"{path}: not a regular file")
    if st.st_size > limit:
        raise error(f"{path}: {_mb(st.st_size)}, over the {_mb(limit)} loraexport reads for a {what}")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from e
    if len(raw) > limit:
        raise error(f"{path}: over the {_mb(limit)} loraexport reads for a {what}")
    return raw


def read_json(path: str | Path, error: type[Exception], limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of at most ``limit`` bytes; a missing, unreadable, oversized or
    malformed file raises ``error`` naming the file."""
    p = Path(path)
    return parse_json(read_bounded(p, error, limit, "JSON file"), str(p), error)


def read_json_lines(
    path: str | Path, error: type[Exception], limit: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSON Lines file.

    Each line is read with a cap of ``limit`` bytes (a file with no newline cannot fill
    memory); a line that is not UTF-8, not JSON, too deep or too long raises ``error`` naming
    the file and the line.
    """
    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 (closed below; a generator keeps it open between lines)
    except OSError as e:
        raise error(f"{p}: cannot be read ({e.strerror})") from e
    with f:
        n = 0
        while True:
            try:
                line = f.readline(limit + 1)
            except OSError as e:
                raise error(f"{p}: cannot be read ({e.strerror})") from e
            if not line:
                return
            n += 1
            if len(line) > limit and not line.endswith(b"\n"):
                raise error(f"{p}:{n}: line longer than {_mb(limit)}")
            if not line.strip():
                continue
            yield n, text_only(parse_json(line, f"{p}:{n}", error), f"{p}:{n}", error)
