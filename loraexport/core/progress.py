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
        if self.unit == "B":  # bytes: GB done of GB, the rate, and what is left
            rate = self.n / elapsed if elapsed > 0 else 0.0
            count = f"{self.n / 1e9:.2f}/{self.total / 1e9:.2f} GB {rate / 1e6:.0f} MB/s"
        else:
            rate = self.n / elapsed if elapsed > 0 else 0.0
            count = f"{self.n}/{self.total} {self.unit}"
        eta = f" ETA {_clock((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        sys.stderr.write(f"\r{self.desc} {bar} {count} {_clock(elapsed)}{eta} {extras}\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


def _clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` past an hour)."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
