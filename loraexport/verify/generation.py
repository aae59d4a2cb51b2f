"""Greedy generation compared: onnxruntime's tokens against the unmerged PyTorch model's, row by
row up to the end token, and (with held-out targets) both texts scored against them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from loraexport.models.base import ModelFamily
from loraexport.verify.task import first_end, until_eos


@dataclass
class GenerationResult:
    rows: int
    identical_rows: int
    max_new_tokens: int
    first_mismatch: str | None = None
    # Held-out data with targets (``--eval-data`` and a tokenizer): rows whose greedy text, up to
    # <eos>, equals the target (both stripped of surrounding spaces), for onnxruntime and torch.
    task_rows: int = 0
    task_exact_onnx: int = 0
    task_exact_reference: int = 0

    @property
    def agreement(self) -> float:
        return self.identical_rows / self.rows if self.rows else 1.0


def compare_generation(
    family: ModelFamily,
    unmerged: nn.Module,
    prompts: list[tuple[dict, int]],
    got_tokens: list[np.ndarray],
    eos: list[int] | int | None,  # every end id
    task: dict[tuple[int, ...], str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> GenerationResult:
    """Greedy decoding: onnxruntime's tokens (with cache, ``got_tokens``) vs torch unmerged, token
    for token up to <eos>; with ``task`` (targets by prompt ids) and ``decode``, both texts are
    scored against the targets."""
    result = GenerationResult(0, 0, 0)
    for (inputs, max_new), got in zip(prompts, got_tokens, strict=True):
        want = family.generate(unmerged, inputs, max_new).numpy()
        result.max_new_tokens = max(result.max_new_tokens, max_new)
        for i, (w, g) in enumerate(zip(want.tolist(), got.tolist(), strict=True)):
            end = first_end(w, eos)  # torch stops at any end id: compared up to and with it
            cut = len(w) if end is None else end + 1
            result.rows += 1
            if w[:cut] == g[:cut]:
                result.identical_rows += 1
            elif result.first_mismatch is None:
                length = inputs["input_ids"].shape[1]
                result.first_mismatch = (
                    f"row {i} of a length-{length} batch: torch {w[:cut]} vs onnx {g[:cut]}"
                )
            target = (task or {}).get(tuple(inputs["input_ids"][i].tolist()))
            if target is not None and decode is not None:
                result.task_rows += 1
                result.task_exact_onnx += decode(until_eos(g, eos)).strip() == target.strip()
                result.task_exact_reference += decode(until_eos(w, eos)).strip() == target.strip()
    return result
