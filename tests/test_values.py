"""core.values: arrays found again by value, bit for bit, through transposed views too."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from loraexport.core.values import ValueIndex, same_bits


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_finds_each_array_and_its_transpose(n, k, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((n, k)).astype(np.float32) for _ in range(3)]
    index = ValueIndex()
    for i, a in enumerate(arrays):
        index.add(a, ("w", i))
        index.add(a.T, ("t", i))
    for i, a in enumerate(arrays):
        assert ("w", i) in index.find(a.copy())
        assert ("t", i) in index.find(np.ascontiguousarray(a.T))


def test_one_changed_element_anywhere_is_not_found():
    # the sample grid is only a key: an element off the grid still decides, bit for bit
    a = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    index = ValueIndex()
    index.add(a, "a")
    for i, j in [(1, 1), (63, 47), (32, 5)]:
        b = a.copy()
        b[i, j] = np.nextafter(b[i, j], np.float32(np.inf))
        assert index.find(b) == []
    assert index.find(a.copy()) == ["a"]


def test_equal_arrays_are_all_found_in_order_and_signed_zeros_differ():
    z = np.zeros((20, 20), np.float32)
    index = ValueIndex()
    index.add(z, "first")
    index.add(z.copy(), "second")
    assert index.find(z) == ["first", "second"]
    assert index.find(-z) == []
    assert not same_bits(z, z[:, :19])
