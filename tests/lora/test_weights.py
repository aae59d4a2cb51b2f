"""``lora/weights.py``: one finite weight per adapter, checked in one place."""

from __future__ import annotations

import math

import pytest

from loraexport.errors import InvalidInputError, UsageError
from loraexport.lora.weights import adapter_weights


@pytest.mark.parametrize("n", [1, 3])
def test_no_weights_means_one_each(n):
    assert adapter_weights(n, None) == [1.0] * n


def test_weights_are_floats_and_may_be_negative_or_zero():
    got = adapter_weights(3, [2, -0.5, 0])
    assert got == [2.0, -0.5, 0.0] and all(type(w) is float for w in got)


@pytest.mark.parametrize("weights", [[], [1.0], [1.0, 2.0, 3.0]])
def test_a_count_that_differs_is_a_usage_error(weights):
    with pytest.raises(UsageError) as e:
        adapter_weights(2, weights)
    assert str(e.value) == f"2 --adapter but {len(weights)} --weight: give one weight per adapter"
    assert e.value.exit_code == 2  # as the CLI's option count is


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", None])
def test_a_weight_that_is_not_a_finite_number_is_invalid_input(bad):
    with pytest.raises(InvalidInputError) as e:
        adapter_weights(2, [1.0, bad])
    assert str(e.value) == f"adapter weight {bad} is not a finite number"
    assert e.value.exit_code == 3


def test_a_boolean_is_not_a_weight():
    with pytest.raises(InvalidInputError, match="not a finite number"):
        adapter_weights(1, [True])
