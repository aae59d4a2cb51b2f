"""A minimal progress bar on stderr that draws only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``with Progress(total, "train") as p: p.update(1, loss=0.3)``.

    Silent when stderr is not a terminal (CI logs, pipes) or when ``enabled`` is False.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self.enabled = enabled and sys.stderr.isatty()
        self.postfix: dict[str, Any] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        self.postfix.update(postfix)
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw > 0.1 or self.n >= self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.n / self.total if self.total else 1.0
        width = 24
        bar = "█" * int(frac * width) + "·" * (width - int(frac * width))
        elapsed = now - self.start
        extras = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        sys.stderr.write(
            f"\r{self.desc} {bar} {self.n}/{self.total} {self.unit} {elapsed:5.1f}s {extras}\x1b[K"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
