"""Latency: interleaved timing of several variants, medians and spread (``time_interleaved``),
and the comparison verify makes with it (``measure_latency``).

Variants are timed A B C A B C … after a warm-up, so that slow phases of a noisy machine
hit every variant alike and the ratio of two medians holds. Threads are fixed for torch and
onnxruntime (no spinning: torch runs in turn on the same cores; ``runtime.session_options``)
and reported.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraexport.errors import InvalidInputError
from loraexport.models.base import ModelFamily
from loraexport.runtime.model import OnnxModel, RuntimeInputError
from loraexport.verify.device import bound_forward, float16_export


@dataclass
class LatencyStats:
    p50_ms: float
    p90_ms: float
    iqr_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats:
        ms = np.asarray(seconds) * 1e3
        q25, q50, q75, q90 = np.percentile(ms, [25, 50, 75, 90])
        return cls(float(q50), float(q90), float(q75 - q25), len(ms))


@dataclass
class LatencyCase:
    batch: int
    seq: int
    stats: dict[str, LatencyStats] = field(default_factory=dict)

    def ratio(self, a: str, b: str) -> float | None:
        if a in self.stats and b in self.stats:
            return self.stats[a].p50_ms / self.stats[b].p50_ms
        return None


@dataclass
class LatencyResult:
    provider: str
    threads: int
    cases: list[LatencyCase] = field(default_factory=list)
    spinning: bool = False  # onnxruntime's threads spin between runs (``runtime.session_options``)


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    *,
    warmup: int = 5,
    min_runs: int = 100,
    max_runs: int = 400,
    budget_s: float = 4.0,
    floor_runs: int = 3,
    seed: int = 0,
    gap_s: float = 0.002,
    on_round: Callable[[], None] | None = None,
) -> dict[str, LatencyStats]:
    """Time each variant in rounds (one call of each per round).

    Rounds go on until ``budget_s`` has passed and ``min_runs`` rounds are done; a slow model
    that cannot reach ``min_runs`` stops at twice the budget once it has ``floor_runs`` rounds
    (the report gives the count). Warm-up stops early after 1 round when a round is slow.

    The order is shuffled every round (seeded), so no variant always runs right after the
    same other one: torch's OpenMP threads may still be busy-waiting when the next call starts,
    which slows whatever follows a torch call. (A fixed or rotated order keeps neighbours.)
    An untimed pause of ``gap_s`` before each call lets those threads go idle, so every call
    starts from the same state; measured here, without it an ONNX graph timed right after a
    batch-16 torch call ran ~8% slower than an identical one that was not.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        for fn in variants.values():
            fn()
        if time.perf_counter() - start > budget_s / 4:
            break
    times: dict[str, list[float]] = {name: [] for name in variants}
    start = time.perf_counter()
    rounds = 0
    names = list(variants)
    rng = random.Random(seed)

    def more() -> bool:
        elapsed = time.perf_counter() - start
        if rounds >= max_runs:
            return False
        if elapsed < budget_s or rounds < floor_runs:
            return True
        return rounds < min_runs and elapsed < 2 * budget_s

    while more():
        rng.shuffle(names)
        for name in names:
            fn = variants[name]
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
        if on_round:
            on_round()
    return {name: LatencyStats.of(ts) for name, ts in times.items()}


def open_model(
    directory: Path, provider: str, threads: int | None, meta: dict | None = None, adapter: str | None = None
) -> OnnxModel:
    """An export opened in onnxruntime; one that cannot be run is the user's input (exit 3).
    ``meta``: its description, when already read (or not yet written); ``adapter``: the
    adapter active in every call (``--mode adapter``)."""
    try:
        return OnnxModel(directory, provider, threads, meta, adapter, spinning=False)  # torch runs in turn
    except RuntimeInputError as e:
        raise InvalidInputError(str(e)) from e


def measure_latency(
    family: ModelFamily,
    provider: str,
    threads: int,
    models: dict[str, nn.Module],
    onnx_dirs: dict[str, tuple[Path, dict | None]],
    log: Callable[[str], None] = lambda _: None,
    budget_s: float = 4.0,
    points: tuple[tuple[int, int], ...] | None = None,
    bound: bool | None = None,
) -> LatencyResult:
    """Time torch (unmerged, merged) and ONNX (merged, base, unmerged), interleaved, per (batch, seq).

    ``onnx_dirs``: each ONNX variant's folder and its description (None: read from the folder).
    On CUDA (``bound`` defaults to it): single-graph exports are timed through an io-binding with
    inputs and outputs on the device, and a float16-compute copy of the merged export is timed
    as ``onnx_merged_fp16`` (``verify.device``); a copy that cannot be made or run is left out,
    with the reason in the log.
    """
    torch.set_num_threads(threads)
    device = "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"
    # Measured here: of several identical sessions opened in a row, the first ran 5-8% slower
    # than the others, whichever graph it held. A sacrificial session absorbs that, so the
    # merged/base ratio compares like with like.
    first_dir, first_meta = next(iter(onnx_dirs.values()))
    sacrificial = open_model(first_dir, provider, threads, first_meta)
    sessions = {name: open_model(d, provider, threads, m) for name, (d, m) in onnx_dirs.items()}
    bound = provider == "cuda" if bound is None else bound
    scratch = tempfile.TemporaryDirectory(prefix="loraexport-fp16-") if provider == "cuda" else None
    if scratch is not None and "onnx_merged" in onnx_dirs:
        try:
            half = float16_export(onnx_dirs["onnx_merged"][0], Path(scratch.name) / "fp16")
            sessions["onnx_merged_fp16"] = open_model(half, provider, threads)
        except Exception as e:  # the converter and onnxruntime raise many types
            log(f"latency [{provider}]: no float16-compute variant ({type(e).__name__}: {str(e)[:200]})")
    result = LatencyResult(provider, threads)
    torch_models = (
        {n: m.to(device) for n, m in models.items()} if provider == "cpu" or device == "cuda" else {}
    )
    for batch, seq in points or family.latency_points:
        inputs = family.latency_inputs(models["torch_unmerged"], batch, seq)
        np_in = {k: v.numpy() for k, v in inputs.items()}
        dev_in = {k: v.to(device) for k, v in inputs.items()}
        variants: dict[str, Callable[[], object]] = {}
        for name, m in torch_models.items():
            variants[name] = _torch_call(m, dev_in, device)
        for name, s in sessions.items():
            call = bound_forward(s, np_in, "cuda" if provider == "cuda" else "cpu") if bound else None
            variants[name] = call or (lambda s=s, x=np_in: s.forward(**x))
        log(f"latency [{provider}] batch {batch} × seq {seq}: {len(variants)} variants, interleaved …")
        result.cases.append(LatencyCase(batch, seq, time_interleaved(variants, budget_s=budget_s)))
    for m in torch_models.values():
        m.to("cpu")
    del sacrificial, sessions
    if scratch is not None:
        scratch.cleanup()
    return result


def _torch_call(model: nn.Module, inputs: dict, device: str) -> Callable[[], object]:
    @torch.no_grad()
    def call() -> object:
        out = model(**inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call
