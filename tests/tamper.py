"""Planting wrong things in an export, as a hostile user or a broken tool would, and then making
``loraexport.json`` agree with the changed files (sha256 of every file, and its own digest), so
that only the proof can tell.

- ``edit_initializers(path, change)``: ``change(arrays)`` gets every initializer of an ONNX file
  as a dict of numpy arrays and changes it in place; the file is written back as it was stored
  (external data included);
- ``swap(arrays, a, b)``, ``names(arrays, *patterns)``: helpers for the changes;
- ``restamp(directory)``: ``loraexport.json`` rewritten to match the files now there.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from loraexport.artifact.manifest import SELF_DIGEST, description_digest, sha256


def edit_initializers(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    model = onnx.load(str(path))  # external data loaded too
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    before = {k: v.tobytes() for k, v in arrays.items()}
    change(arrays)
    assert any(arrays[k].tobytes() != before[k] for k in arrays), "the change changed nothing"
    for t in model.graph.initializer:
        if arrays[t.name].tobytes() != before[t.name]:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name].astype(arrays[t.name].dtype), t.name))
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def names(arrays: dict, *patterns: str) -> list[str]:
    """The initializer names matching every regular expression, sorted."""
    return sorted(n for n in arrays if all(re.search(p, n) for p in patterns))


def swap(arrays: dict, a: str, b: str) -> None:
    assert arrays[a].shape == arrays[b].shape, (a, b)
    arrays[a], arrays[b] = arrays[b].copy(), arrays[a].copy()


def swap_layers(arrays: dict, *patterns: str, layers: tuple[int, int] = (0, 1)) -> int:
    """Swap every initializer of layer ``layers[0]`` matching ``patterns`` with layer
    ``layers[1]``'s of the same name (``layers.0.`` ↔ ``layers.1.``); returns how many pairs."""
    i, j = layers
    pairs = 0
    for name in names(arrays, rf"layers\.{i}\.", *patterns):
        other = name.replace(f"layers.{i}.", f"layers.{j}.")
        if other in arrays and arrays[other].shape == arrays[name].shape:
            swap(arrays, name, other)
            pairs += 1
    assert pairs, f"no tensors of layers {i} and {j} match {patterns}"
    return pairs


def restamp(directory: Path) -> None:
    """``loraexport.json``: every listed file's sha256 recomputed, then its own digest."""
    path = directory / "loraexport.json"
    meta = json.loads(path.read_text())
    meta["files"] = {rel: sha256(directory / rel) for rel in meta["files"] if (directory / rel).is_file()}
    meta[SELF_DIGEST] = description_digest(meta)
    path.write_text(json.dumps(meta, indent=2) + "\n")


def edit_meta(directory: Path, change: Callable[[dict], None]) -> None:
    """``loraexport.json`` changed by ``change``, then restamped."""
    path = directory / "loraexport.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    restamp(directory)


def planted(
    src: Path, out: Path, change: Callable[[dict[str, np.ndarray]], None], graph: str = "model.onnx"
) -> Path:
    """A copy of the export ``src`` at ``out`` with ``change`` made to ``graph``'s initializers,
    restamped (so that only the proof or parity can tell)."""
    shutil.copytree(src, out)
    edit_initializers(out / graph, change)
    restamp(out)
    return out
