"""Training data: JSON Lines with one ``{"source": str, "target": str}`` object per line (or
``{"prompt": str, "completion": str}``, the Hugging Face decoders' format, read as the same pair)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from loraexport.core.io import require_file
from loraexport.core.untrusted import read_json_lines
from loraexport.errors import DataFormatError

Pair = tuple[str, str]


def read_pairs(path: str | Path) -> list[Pair]:
    """Every (source, target) of a JSON Lines file; each line is bounded and checked (not UTF-8, not
    JSON, nested too deeply, a number too long: ``DataFormatError`` naming the line)."""
    p = require_file(path, "data file")
    pairs: list[Pair] = []
    for n, obj in read_json_lines(p, DataFormatError):
        keys = ("source", "target") if isinstance(obj, dict) and "source" in obj else ("prompt", "completion")
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in keys):
            raise DataFormatError(
                f'{p}:{n}: expected {{"source": str, "target": str}} or {{"prompt": str, "completion": str}}'
            )
        pairs.append((obj[keys[0]], obj[keys[1]]))
    if not pairs:
        raise DataFormatError(f"{p}: no examples")
    return pairs


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s, t in pairs:
            f.write(json.dumps({"source": s, "target": t}) + "\n")


def split(pairs: list[Pair], eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic held-out split; sources in the eval part never appear in training."""
    if not 0 < eval_fraction < 1:
        raise DataFormatError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    sources = sorted({s for s, _ in pairs})
    random.Random(seed).shuffle(sources)
    held = set(sources[: max(1, int(len(sources) * eval_fraction))])
    train = [p for p in pairs if p[0] not in held]
    if not train:
        raise DataFormatError("data set too small to hold out an evaluation split")
    return train, [p for p in pairs if p[0] in held]
