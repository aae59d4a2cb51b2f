"""Greedy generation compared: onnxruntime's tokens against the unmerged PyTorch model's, row by
row up to the end token, and (with held-out targets) both texts scored against them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    # Rows that part at a tie (``resolve_ties``): where onnxruntime's token and the reference's are
    # within the logits' tolerance of each other in float64, either is a correct greedy choice.
    tied_rows: int = 0
    ties: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parted: list[Parted] = []  # every row that differs, for ``resolve_ties`` (not reported)

    @property
    def agreement(self) -> float:
        return self.identical_rows / self.rows if self.rows else 1.0

    @property
    def passed(self) -> bool:
        return self.identical_rows + self.tied_rows == self.rows


@dataclass(frozen=True)
class Parted:
    """Where a row's tokens first differ: the prompt row, the reference's tokens before that step,
    its token there and onnxruntime's, and the row's description."""

    prompt: np.ndarray  # (T,) the prompt's ids (prompts are never padded)
    before: list[int]
    want: int
    got: int
    what: str


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
            else:
                length = inputs["input_ids"].shape[1]
                what = f"row {i} of a length-{length} batch: torch {w[:cut]} vs onnx {g[:cut]}"
                k = next(j for j in range(cut) if j >= len(g) or w[j] != g[j])
                prompt = inputs["input_ids"][i].numpy()
                result.parted.append(Parted(prompt, w[:k], w[k], g[k] if k < len(g) else -1, what))
                result.first_mismatch = result.first_mismatch or what
            target = (task or {}).get(tuple(inputs["input_ids"][i].tolist()))
            if target is not None and decode is not None:
                result.task_rows += 1
                result.task_exact_onnx += decode(until_eos(g, eos)).strip() == target.strip()
                result.task_exact_reference += decode(until_eos(w, eos)).strip() == target.strip()
    return result


def resolve_ties(
    result: GenerationResult, logits: Callable[[np.ndarray], np.ndarray], tolerance: float
) -> None:
    """Rows whose tokens part where the reference's float64 logits of its token and onnxruntime's
    are within ``tolerance`` of each other count as tied, not different: the parity allows the
    export's logits that error (``tolerance``: the largest it allowed), so either token is a
    correct greedy choice there, and what follows is another, equally right continuation.
    ``logits(ids)``: the reference's float64 next-token logits after ``ids`` (T,). Any other row
    stays a mismatch (``first_mismatch``). Causal models only; a row that stopped early (no token)
    is never a tie."""
    real = []
    for p in result.parted:
        if p.got < 0:
            real.append(p)
            continue
        row = logits(np.concatenate([p.prompt, np.asarray(p.before, p.prompt.dtype)]))
        margin = float(row[p.want] - row[p.got])
        if abs(margin) <= tolerance:
            result.tied_rows += 1
            result.ties.append(
                f"{p.what}: a tie at new token {len(p.before)} ({p.want} vs {p.got}: float64 logits "
                f"{margin:.2g} apart, within the tolerance {tolerance:.2g})"
            )
        else:
            real.append(p)
    result.parted = real
    result.first_mismatch = real[0].what if real else None
