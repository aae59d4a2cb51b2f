"""click parameter types for numbers: a value that cannot work is a usage error (exit 2) naming
the option, before any work starts.

click's ``FLOAT`` takes ``nan`` and ``inf`` (and ``FloatRange`` lets ``nan`` through: every
comparison with it is false); its ``INT`` takes integers of any size. These take finite
numbers within bounds that the code behind each option can honour.
"""

from __future__ import annotations

import math

import click

MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy take 64-bit seeds; 2**63 - 1 in every one
# = export.onnx.MIN_OPSET, MAX_OPSET, MAX_OPSETS["torchscript"] (not imported: that loads torch;
# a test holds them equal)
MIN_OPSET, MAX_OPSET, MAX_OPSET_TORCHSCRIPT = 18, 28, 20
MAX_RANK = 65536
RANKS = (1, 2, 4, 8, 64)  # = analyze.sweep.RANKS (not imported: the CLI loads torch lazily)


def _bound(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else f"{x:,}"


class Number(click.ParamType):
    """A finite ``int`` or ``float`` in ``[lo, hi]`` (``lo_open``/``hi_open`` exclude an end)."""

    def __init__(
        self,
        kind: type = float,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> None:
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.name = "integer" if kind is int else "number"

    def _range(self) -> str:
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"in {left}{_bound(self.lo)}, {_bound(self.hi)}{right}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_bound(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_bound(self.hi)}"

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number", param, ctx)
        if self.kind is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                text = str(value).strip()
                if len(text) > 30:  # int() of a 5,000-digit string is slow and then out of range
                    self.fail(f"{text[:20]}… is not an integer {self._range()}", param, ctx)
                try:
                    value = int(text)
                except ValueError:
                    self.fail(f"{value!r} is not an integer", param, ctx)
        else:
            try:
                value = float(value)
            except (TypeError, ValueError, OverflowError):
                self.fail(f"{value!r} is not a number", param, ctx)
            if not math.isfinite(value):
                self.fail(f"{value!r} is not a finite number", param, ctx)
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if lo_bad or hi_bad:
            self.fail(f"{value} is not {self._range()}", param, ctx)
        return value

    def __repr__(self) -> str:
        return f"Number({self.kind.__name__}, {self._range()})"


def PositiveInt(hi: int) -> Number:  # noqa: N802 (reads as a type)
    """An integer in [1, hi]."""
    return Number(int, 1, hi)


def Seed() -> Number:  # noqa: N802
    """A seed in [0, 2**63 - 1]."""
    return Number(int, 0, MAX_SEED)


class Warmup(Number):
    """``--warmup``: a fraction of the steps, in [0, 1), or a whole number of steps."""

    def __init__(self) -> None:
        super().__init__(float, 0, 10**7)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if value < 1:
            return value
        if not float(value).is_integer():
            self.fail(f"{value} is neither a fraction below 1 nor a whole number of steps", param, ctx)
        return int(value)


class IntList(click.ParamType):
    """Comma-separated integers in [1, hi], e.g. ``--ranks 1,2,4``."""

    name = "text"

    def __init__(self, hi: int) -> None:
        self.hi = hi

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        items = [x.strip() for x in str(value).split(",") if x.strip()]
        if not items or not all(x.isdigit() and len(x) <= 6 for x in items):
            self.fail(f"expected comma-separated integers, got {value!r}", param, ctx)
        numbers = [int(x) for x in items]
        if min(numbers) < 1 or max(numbers) > self.hi:
            self.fail(f"expected positive ranks up to {self.hi}, got {value!r}", param, ctx)
        return numbers


class Names(click.ParamType):
    """Comma-separated names, e.g. ``--targets q,v``."""

    name = "text"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        items = [t.strip() for t in str(value).split(",") if t.strip()]
        if not items:
            self.fail("give at least one module name, e.g. q,v", param, ctx)
        return items
