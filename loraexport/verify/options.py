"""``VerifyOptions``: how an export is checked (the CLI's --provider, --samples, ... options).

Checked when made, before any work, with the bounds the CLI's option types enforce, so callers
of the Python API get them too. No torch here: the CLI builds it while parsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from loraexport.core.enums import Precision
from loraexport.errors import InvalidInputError
from loraexport.verify.gates import Budget


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class VerifyOptions:
    """How ``verify`` checks an export (the CLI's --provider, --samples, ... options)."""

    providers: list[str] | None = None  # default: CPU, plus CUDA when onnxruntime has it
    samples: int = 6  # parity cases
    eval_data: str | Path | None = None  # its sources are the generation prompts
    latency: bool = True
    threads: int | None = None  # default: the cores available
    seed: int = 0
    latency_points: tuple[tuple[int, int], ...] | None = None  # default: the family's
    latency_budget_s: float = 4.0  # timing per (batch, seq) point
    half: tuple[str, ...] = ()  # "float16"/"bfloat16": report what storing merged weights in them costs
    # a budget for what a lossy export may cost against the unmerged float32 model (verify.gates)
    min_top1: float | None = None
    min_adapter_retained: float | None = None

    def __post_init__(self) -> None:
        """The bounds the CLI's option types enforce, for callers of the Python API too."""
        checks = {
            "samples": _is_int(self.samples) and 1 <= self.samples <= 1000,
            "threads": self.threads is None or _is_int(self.threads) and 1 <= self.threads <= 256,
            "seed": _is_int(self.seed) and 0 <= self.seed <= 2**63 - 1,
            "latency_budget_s": isinstance(self.latency_budget_s, (int, float))
            and math.isfinite(self.latency_budget_s)
            and 0 < self.latency_budget_s <= 3600,
            "half": isinstance(self.half, (tuple, list))
            and all(h in Precision.choices(half_only=True) for h in self.half),
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidInputError(f"verify option {name}={getattr(self, name)!r} cannot be used")
        self.budget  # noqa: B018 - checked now (InvalidInputError), before any work

    @property
    def budget(self) -> Budget:
        return Budget(self.min_top1, self.min_adapter_retained)


OPTION_FIELDS = tuple(f.name for f in fields(VerifyOptions))


def options_of(options: VerifyOptions | None, given: dict) -> VerifyOptions:
    """``options``, or the ``VerifyOptions`` made of the keywords ``given`` (never both)."""
    if options is not None:
        if given:
            raise TypeError(f"give options= or its fields, not both ({', '.join(sorted(given))})")
        return options
    return VerifyOptions(**given)
