"""Resident memory of this process: now, its peak so far, and the peak within a stage.

``Stage`` samples ``/proc/self/statm`` in a background thread (every 20 ms) while a stage runs, so
each stage of a pipeline reports its own peak, not the process's peak so far. Where ``/proc`` is
missing (not Linux), the stage's peak is the process's (``ru_maxrss``) at its end.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
INTERVAL = 0.02


def rss() -> int:
    """Resident bytes now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """The process's peak resident bytes so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def available() -> int | None:
    """MemAvailable of this machine in bytes (None where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    peak_rss: int = 0  # bytes, within the stage
    rss_after: int = 0

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 3),
            "peak_rss_gb": round(self.peak_rss / 1e9, 3),
            "rss_after_gb": round(self.rss_after / 1e9, 3),
        }


class Stage:
    """``with Stage("export", records): ...`` appends the stage's time and peak memory to ``records``."""

    def __init__(self, name: str, records: list[StageRecord]) -> None:
        self.record = StageRecord(name)
        self.records = records
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.record.peak_rss = max(self.record.peak_rss, rss())

    def __enter__(self) -> StageRecord:
        self.record.peak_rss = rss()
        self.t0 = time.perf_counter()
        self._thread.start()
        return self.record

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.record.seconds = time.perf_counter() - self.t0
        now = rss()
        self.record.rss_after = now
        self.record.peak_rss = max(self.record.peak_rss, now) if now else peak_rss()
        self.records.append(self.record)


def stages_markdown(stages: list[dict], memory: dict) -> list[str]:
    """report.md's "Stages" section: each stage's wall time and peak RSS, and the run's memory."""
    if not stages:
        return []
    lines = ["", "## Stages", "", "| stage | wall s | peak RSS GB | RSS after GB |", "|---|---:|---:|---:|"]
    for st in stages:
        row = (st["name"], f"{st['seconds']:.1f}", f"{st['peak_rss_gb']:.2f}", f"{st['rss_after_gb']:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    if memory:
        peak, stored, f32 = (memory.get(k, 0.0) for k in ("peak_rss_gb", "weights_gb", "float32_weights_gb"))
        lines.append(
            f"\nPeak resident memory of the run: {peak:.2f} GB; the checkpoint's weights "
            f"{stored:.2f} GB as stored, {f32:.2f} GB in float32."
        )
    return lines
