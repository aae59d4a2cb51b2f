"""How many threads torch computes with: one for a model too small to gain from more, else the
cores this process may use (or what the user asked for).

A small model's matrix products take microseconds, less than waking a second OpenMP thread
costs; and on a machine whose cores another job keeps busy, a thread that spins waiting for
its peer makes every product wait for the scheduler. Measured on the sample Transformer
(0.93 M parameters, 2 vCPUs): ``make demo``'s training took 508 s with two threads while
another job used the cores, 31 s with one, the adapter bit-identical.
"""

from __future__ import annotations

import os

# At or below this many parameters torch runs on one thread (measured on 2 vCPUs: the tiny test
# models and the 0.93 M sample gain nothing from a second thread; SmolLM2-135M does).
SMALL_MODEL_PARAMS = 20_000_000


def cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose(parameters: int, requested: int | None = None) -> tuple[int, str]:
    """The thread count for a model of ``parameters``, and why (for the log and the report)."""
    if requested is not None:
        return requested, "as asked (--threads)"
    if parameters <= SMALL_MODEL_PARAMS:
        millions = parameters / 1e6
        return 1, f"{millions:.2f} M parameters: too small to gain from a second thread"
    n = cores()
    return n, f"{parameters / 1e6:.0f} M parameters: one per core this process may use"


def use(parameters: int, requested: int | None = None, log=None) -> int:
    """Set torch's thread count by ``choose``, say it in ``log``, return it."""
    import torch

    n, why = choose(parameters, requested)
    torch.set_num_threads(n)
    if log is not None:
        log(f"torch on {n} thread{'s' if n != 1 else ''} ({why})")
    return n
