"""``verify/options.py``: ``VerifyOptions`` checks the bounds the CLI's option types enforce,
for callers of the Python API too, when it is made."""

from __future__ import annotations

import math

import pytest

from loraexport.errors import InvalidInputError
from loraexport.verify.options import VerifyOptions


def test_the_defaults_are_valid():
    o = VerifyOptions()
    assert (o.samples, o.seed, o.threads, o.latency, o.half) == (6, 0, None, True, ())


@pytest.mark.parametrize(
    "name, value",
    [("samples", 1), ("samples", 1000), ("threads", 1), ("threads", 256), ("seed", 2**63 - 1)]
    + [("latency_budget_s", 3600), ("latency_budget_s", 0.01)],
)
def test_the_bounds_are_inclusive(name, value):
    assert getattr(VerifyOptions(**{name: value}), name) == value


@pytest.mark.parametrize(
    "name, value",
    [
        ("samples", 0),
        ("samples", 1001),
        ("samples", 2.0),
        ("threads", 0),
        ("threads", 257),
        ("seed", -1),
        ("seed", 2**63),
        ("latency_budget_s", 0),
        ("latency_budget_s", 3601),
        ("latency_budget_s", math.nan),
        ("latency_budget_s", math.inf),
        ("latency_budget_s", "4"),
    ],
)
def test_a_value_out_of_bounds_is_refused_naming_it(name, value):
    with pytest.raises(InvalidInputError) as e:
        VerifyOptions(**{name: value})
    assert str(e.value) == f"verify option {name}={value!r} cannot be used"


@pytest.mark.parametrize("field", ["samples", "threads", "seed"])
def test_a_boolean_is_not_a_count(field):
    with pytest.raises(InvalidInputError, match=field):
        VerifyOptions(**{field: True})


def test_half_names_a_half_precision():
    assert VerifyOptions(half=("float16", "bfloat16")).half == ("float16", "bfloat16")
    with pytest.raises(InvalidInputError, match="half"):
        VerifyOptions(half=("int8",))
