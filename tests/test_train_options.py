"""``training/options.py``: ``TrainOptions`` checks the bounds the CLI's option types enforce, for
callers of the Python API too, when it is made; ``train`` takes it or its fields, not both."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import click
import pytest

from loraexport.cli.types import Number
from loraexport.errors import InvalidInputError
from loraexport.training.options import TrainOptions


def test_the_defaults_are_valid():
    o = TrainOptions()
    assert (o.rank, o.alpha, o.steps, o.lr, o.batch_size, o.warmup, o.seed) == (
        8,
        16.0,
        600,
        None,
        None,
        0.05,
        0,
    )


@pytest.mark.parametrize(
    "name, value",
    [("steps", 1), ("steps", 10**7), ("lr", 10), ("lr", 1e-9), ("batch_size", 1), ("batch_size", 65536)]
    + [("seed", 0), ("seed", 2**63 - 1), ("eval_fraction", 0.999), ("eval_fraction", 1e-9)]
    + [("warmup", 0), ("warmup", 0.99), ("warmup", 10**7), ("warmup", 30.0)]
    + [("grad_accum", 1), ("grad_accum", 4096), ("max_length", 2), ("max_length", 65536)]
    + [("rank", 1), ("rank", 65536), ("alpha", 1e-9), ("alpha", 1e6), ("dropout", 0), ("dropout", 0.999)],
)
def test_the_bounds_are_kept(name, value):
    assert getattr(TrainOptions(**{name: value}), name) == value


@pytest.mark.parametrize(
    "name, value",
    [
        ("steps", 0),
        ("steps", 10**7 + 1),
        ("steps", 10.0),
        ("lr", 0),
        ("lr", 10.5),
        ("lr", math.nan),
        ("lr", math.inf),
        ("batch_size", 0),
        ("batch_size", 65537),
        ("seed", -1),
        ("seed", 2**63),
        ("eval_fraction", 0),
        ("eval_fraction", 1),
        ("eval_fraction", 10**400),  # too large for a float: refused, not an OverflowError
        ("warmup", -0.1),
        ("warmup", 1.5),  # neither a fraction below 1 nor a whole number of steps
        ("warmup", 10**7 + 1),
        ("grad_accum", 0),
        ("grad_accum", 4097),
        ("max_length", 1),
        ("max_length", 65537),
        ("rank", 0),
        ("rank", 65537),
        ("rank", 4.0),
        ("alpha", 0),
        ("alpha", -16.0),
        ("alpha", 1e6 + 1),
        ("alpha", math.nan),
        ("dropout", -0.1),
        ("dropout", 1),
        ("dropout", math.inf),
        ("lr", "3e-3"),
    ],
)
def test_a_value_out_of_bounds_is_refused_naming_it(name, value):
    with pytest.raises(InvalidInputError) as e:
        TrainOptions(**{name: value})
    assert str(e.value) == f"{name} {value!r} cannot be used for training"
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name", ["steps", "batch_size", "seed", "grad_accum", "max_length", "lr", "rank", "alpha", "dropout"]
)
def test_a_boolean_is_not_a_number(name):
    with pytest.raises(InvalidInputError, match=f"^{name} True cannot be used for training$"):
        TrainOptions(**{name: True})


def test_the_first_value_out_of_bounds_is_named():
    with pytest.raises(InvalidInputError, match="^steps 0 "):
        TrainOptions(max_length=1, steps=0)


def _cli_number_options() -> list[click.Parameter]:
    command = importlib.import_module("loraexport.cli.train").train  # the package's ``train`` is the command
    return [p for p in command.params if isinstance(p.type, Number)]


def test_every_number_the_cli_takes_is_a_field():
    """So the bounds test below covers each of them (a new one shows up here first)."""
    names = {p.name for p in _cli_number_options()}
    assert len(names) == 11 and names <= {f.name for f in dataclasses.fields(TrainOptions)}


@pytest.mark.parametrize("param", _cli_number_options(), ids=lambda p: p.name)
def test_the_bounds_are_those_of_the_cli(param):
    """At each end of the CLI's range: the end itself (kept unless the range is open there) and
    the next value beyond it (refused), for the library as for the CLI's type."""
    t = param.type
    beyond = (
        (t.lo - 1, t.hi + 1)
        if t.kind is int
        else (math.nextafter(t.lo, -math.inf), math.nextafter(t.hi, math.inf))
    )
    for end, is_open, past in ((t.lo, t.lo_open, beyond[0]), (t.hi, t.hi_open, beyond[1])):
        end = t.kind(end)
        if is_open:
            with pytest.raises(InvalidInputError, match=f"^{param.name} "):
                TrainOptions(**{param.name: end})
        else:
            assert getattr(TrainOptions(**{param.name: end}), param.name) == end
        with pytest.raises(InvalidInputError, match=f"^{param.name} "):
            TrainOptions(**{param.name: past})
        with pytest.raises(click.BadParameter):
            t.convert(past, param, None)


def test_options_are_checked_once_and_frozen():
    o = TrainOptions(rank=4)
    with pytest.raises(AttributeError):
        o.steps = 0  # type: ignore[misc]


# ---- train(): the options object or its fields -------------------------------------------------
def test_train_refuses_options_and_fields_together(tmp_path):
    from loraexport.stages.train import train

    with pytest.raises(
        TypeError, match=r"^train\(\) takes options or their fields .* not both .*rank, steps\)$"
    ):
        train(tmp_path / "base", tmp_path / "d.jsonl", tmp_path / "out", TrainOptions(), rank=4, steps=2)
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_unknown_keyword_as_python_does(tmp_path):
    from loraexport.stages.train import train

    with pytest.raises(TypeError, match=r"^train\(\) got an unexpected keyword argument 'ranks'$"):
        train(tmp_path / "base", tmp_path / "d.jsonl", tmp_path / "out", ranks=4)
    assert not (tmp_path / "out").exists()


def test_train_refuses_options_of_another_type(tmp_path):
    from loraexport.stages.train import train

    with pytest.raises(TypeError, match="options must be a TrainOptions, not dict"):
        train(tmp_path / "base", tmp_path / "d.jsonl", tmp_path / "out", {"rank": 4})


def test_train_checks_its_fields_before_any_work(tmp_path):
    from loraexport.stages.train import train

    with pytest.raises(InvalidInputError, match="^warmup 1.5 cannot be used for training$"):
        train(tmp_path / "base", tmp_path / "d.jsonl", tmp_path / "out", warmup=1.5)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_same_options_train_the_same_adapter(tmp_path, sample_base, small_data):
    """``train(..., TrainOptions(**f))`` and ``train(..., **f)`` are one call."""
    from loraexport.stages.train import train

    fields = dict(rank=2, steps=2, batch_size=8, seed=3, targets=["q"])
    a = train(sample_base, small_data, tmp_path / "a", TrainOptions(**fields), show_progress=False)
    b = train(sample_base, small_data, tmp_path / "b", show_progress=False, **fields)
    assert a.losses == b.losses
    recorded = [json.loads((tmp_path / d / "training.json").read_text()) for d in "ab"]
    assert recorded[0] | {"seconds": 0} == recorded[1] | {"seconds": 0}  # the time taken differs
