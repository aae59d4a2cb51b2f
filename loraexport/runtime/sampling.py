"""How each new token is chosen: greedy (temperature 0, the default) or sampled with a
temperature from the ``top_k`` most likely tokens and the fewest whose probabilities sum to
``top_p``, drawn from ``numpy.random.default_rng(seed)``. numpy only.

``Sampling(...)`` checks its values when made (a ``RuntimeInputError`` naming the argument), so
a call is refused before any work; ``picker()`` gives the ``pick(logits) -> ids`` that
``runtime.decode.tokens`` takes. ``top_k=1`` chooses exactly what greedy does: tokens are
ranked by a stable sort, so of equal logits the lowest id comes first, as ``argmax`` takes it.
So does a temperature small enough that only the largest logit keeps a probability (1e-30:
any two float32 logits that differ), except between exactly equal best logits, which it draws
between.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from loraexport.core.untrusted import short_repr
from loraexport.runtime.decode import argmax
from loraexport.runtime.files import RuntimeInputError


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float | np.floating)) and math.isfinite(value)


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0: greedy (``top_k``, ``top_p`` and ``seed`` then change nothing)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p, seed = self.temperature, self.top_k, self.top_p, self.seed
        if not _is_number(t) or t < 0:
            raise RuntimeInputError(
                f"temperature must be a finite number ≥ 0 (0: greedy), not {short_repr(t)}"
            )
        if k is not None and (not _is_int(k) or k < 1):
            raise RuntimeInputError(f"top_k must be an integer ≥ 1 or None, not {short_repr(k)}")
        if p is not None and (not _is_number(p) or not 0 < p <= 1):
            raise RuntimeInputError(f"top_p must be a number in (0, 1] or None, not {short_repr(p)}")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise RuntimeInputError(f"seed must be an integer ≥ 0 or None, not {short_repr(seed)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def picker(self) -> Callable[[np.ndarray], np.ndarray]:
        """``pick(logits (B, V)) -> ids (B,)``: ``argmax``, or a sampler with its own generator
        (seeded: the same seed, the same tokens)."""
        if self.greedy:
            return argmax
        rng = np.random.default_rng(self.seed)
        return lambda logits: sample(logits, self, rng)


def sample(logits: np.ndarray, how: Sampling, rng: np.random.Generator) -> np.ndarray:
    """One id per row of ``logits`` (B, V), drawn as ``how`` says (its temperature > 0)."""
    x = np.asarray(logits, np.float64) / how.temperature  # (B, V); float64: 1/T may be huge
    order = np.argsort(-x, axis=-1, kind="stable")  # (B, V) best first; ties: the lowest id first
    if how.top_k is not None:
        order = order[:, : how.top_k]  # (B, K)
    z = np.take_along_axis(x, order, axis=-1)
    p = np.exp(z - z[:, :1])  # the best is 1; a logit far below it underflows to exactly 0
    p /= p.sum(axis=-1, keepdims=True)
    if how.top_p is not None and how.top_p < 1:
        before = np.cumsum(p, axis=-1) - p  # the mass of the better tokens
        p = np.where(before < how.top_p, p, 0.0)  # the first token is always kept
        p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((p.shape[0], 1))  # (B, 1) in [0, 1)
    chosen = (np.cumsum(p, axis=-1) <= u).sum(axis=-1)  # the first whose cumulative mass passes u
    kept = (p > 0).sum(axis=-1)  # a prefix (p is sorted): rounding never picks a token left out
    return order[np.arange(p.shape[0]), np.minimum(chosen, kept - 1)]
