"""Arrays found again by value: an exporter keeps a weight's numbers but not its module's name
(and may store it transposed), so the proof and the exporters find a tensor's module by what it
holds. Keyed by shape and a fixed grid of 16×16 samples (read without copying the array, also
through a transposed view), each candidate then compared bit for bit: one pass over memory per
lookup, not a digest of every array."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

GRID = 16  # samples along each axis


def _key(a: np.ndarray) -> tuple:
    if a.ndim != 2 or a.size == 0:
        return (a.shape, np.ascontiguousarray(a, dtype=np.float32).tobytes())
    rows = np.linspace(0, a.shape[0] - 1, GRID).astype(np.intp)
    cols = np.linspace(0, a.shape[1] - 1, GRID).astype(np.intp)
    return (a.shape, np.ascontiguousarray(a[np.ix_(rows, cols)], dtype=np.float32).tobytes())


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` and ``b`` hold the same float32 numbers, bit for bit (NaNs and signed zeros too)."""
    if a.shape != b.shape:
        return False
    a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    return bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


class ValueIndex:
    """Labels of float arrays, found by an array equal to theirs; several arrays may be equal."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, list[tuple[Hashable, np.ndarray]]] = {}

    def add(self, array: np.ndarray, label: Hashable) -> None:
        self._by_key.setdefault(_key(array), []).append((label, array))

    def find(self, array: np.ndarray) -> list:
        """The labels whose array equals ``array`` bit for bit, in the order they were added."""
        return [label for label, held in self._by_key.get(_key(array), []) if same_bits(held, array)]

    def __bool__(self) -> bool:
        return bool(self._by_key)
