"""``TrainOptions``: how an adapter is trained (the CLI's --rank, --steps, --lr, ... options).

Checked when made, before any work, with the bounds the CLI's option types enforce, so callers
of the Python API get them too (exit 3; the CLI's types refuse them first, exit 2). No torch
here: the CLI builds it while parsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from loraexport.errors import InvalidInputError

MAX_RANK = 65536
MAX_ALPHA = 1e6
MAX_STEPS = 10**7
MAX_BATCH_SIZE = 65536
MAX_GRAD_ACCUM = 4096
MAX_LENGTH = 65536  # tokens per example
MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy take 64-bit seeds


def _is_int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: object, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> bool:
    """A finite int or float in [lo, hi] (``lo_open``/``hi_open`` exclude an end)."""
    try:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False
    return ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


@dataclass(frozen=True)
class TrainOptions:
    """How ``train`` trains an adapter (the CLI's --eval-data, --rank, --steps, ... options).

    ``targets``: module names or a regex (default: the family's query and value projections);
    ``lr``, ``batch_size``: default by base (``stages.train.DEFAULTS``); ``warmup``: a fraction
    of ``steps`` (below 1) or a number of steps. ``grad_accum``, ``max_length`` (default 256,
    at most the model's positions) and ``pack`` apply to Hugging Face bases. Frozen: checked
    once, when made.
    """

    eval_data: str | Path | None = None  # default: hold out eval_fraction of the data
    eval_fraction: float = 0.1
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | str | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    steps: int = 600
    lr: float | None = None
    batch_size: int | None = None
    warmup: float = 0.05
    grad_accum: int = 1
    max_length: int | None = None
    pack: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        """The bounds the CLI's option types enforce, for callers of the Python API too; the
        first value out of bounds is named (in this order)."""
        warmup = self.warmup
        ok = {
            "steps": _is_int(self.steps, 1, MAX_STEPS),
            "lr": self.lr is None or _is_number(self.lr, 0, 10, lo_open=True),
            "batch_size": self.batch_size is None or _is_int(self.batch_size, 1, MAX_BATCH_SIZE),
            "seed": _is_int(self.seed, 0, MAX_SEED),
            "eval_fraction": _is_number(self.eval_fraction, 0, 1, lo_open=True, hi_open=True),
            "warmup": _is_number(warmup, 0, MAX_STEPS) and (warmup < 1 or float(warmup).is_integer()),
            "grad_accum": _is_int(self.grad_accum, 1, MAX_GRAD_ACCUM),
            "max_length": self.max_length is None or _is_int(self.max_length, 2, MAX_LENGTH),
            "rank": _is_int(self.rank, 1, MAX_RANK),
            "alpha": _is_number(self.alpha, 0, MAX_ALPHA, lo_open=True),
            "dropout": _is_number(self.dropout, 0, 1, hi_open=True),
        }
        bad = [name for name, good in ok.items() if not good]
        if bad:
            raise InvalidInputError(f"{bad[0]} {getattr(self, bad[0])!r} cannot be used for training")
