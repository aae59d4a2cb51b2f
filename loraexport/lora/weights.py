"""The weight of each adapter in ``W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ``: one place that checks them."""

from __future__ import annotations

import math

from loraexport.errors import InvalidInputError, UnsupportedAdapterError, UsageError


def adapter_weights(n_adapters: int, weights: list[float] | None) -> list[float]:
    """One finite weight per adapter (default 1.0 each). A count that differs is a usage error
    (exit 2, as the CLI's ``--weight`` per ``--adapter``); a weight that is not finite, exit 3."""
    if weights is None:
        return [1.0] * n_adapters
    if len(weights) != n_adapters:
        raise UsageError(f"{n_adapters} --adapter but {len(weights)} --weight: give one weight per adapter")
    bad = [
        w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
    ]
    if bad:
        raise InvalidInputError(f"adapter weight {bad[0]} is not a finite number")
    return [float(w) for w in weights]


def check_dora(adapters: list, weights: list[float] | None) -> None:
    """A DoRA adapter is merged alone and at weight 1: its magnitude rescales the whole merged
    weight row by row, so a sum of adapters or a weighted one has no defined meaning (PEFT
    defines none either). Refused before any work."""
    dora = [a for a in adapters if a.config.use_dora]
    if not dora:
        return
    if len(adapters) > 1:
        raise UnsupportedAdapterError(
            f"{dora[0].path or 'a DoRA adapter'} is a DoRA adapter: it is merged alone, not combined with "
            "other adapters (its magnitude vector rescales the whole merged weight)"
        )
    if weights is not None and [float(w) for w in weights] != [1.0]:
        raise UnsupportedAdapterError(
            f"{dora[0].path or 'a DoRA adapter'} is a DoRA adapter: it is merged at weight 1 only, "
            f"not {weights[0]:g} (its magnitude vector rescales the whole merged weight)"
        )
