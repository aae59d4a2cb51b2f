"""Decoding, written once: the loop that makes new tokens (``tokens``, one at a time, each
chosen by a picker: ``argmax`` for ``greedy``, or a sampler) and the teacher-forced loop
(``teacher_forced``), over a cache strategy.

A strategy is a ``step(ids, mask, pos) -> logits``: it runs ``ids`` (B, S) — the prompt, then one
token per call — with ``mask`` the attention mask of every position so far (B, total) and ``pos``
the new tokens' positions (B, S), keeps its own key/value cache, and returns the last position's
logits (B, V). The strategies:

* ``Growing`` (here): a graph whose cache grows, present = past + new (a plain causal export, an
  ``--optimize`` torch.onnx graph, the reference encoder-decoder's decoder);
* ``runtime.fused.SharedCache``: one buffer per layer that the fused graph updates in place;
* ``verify.chunked.ChunkedDecoder``: a model larger than memory, a few layers at a time.

Prompts may be left-padded: positions count unmasked tokens only (``positions``), as Hugging Face
models expect. Rows keep decoding after their end token (the batch advances in lockstep); cut
each row at its first end token. Only numpy and the standard library (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from loraexport.errors import InvalidInputError

KV = ("key", "value")
Step = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (ids, mask, pos) -> logits (B, V)


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids from a 0/1 mask: unmasked tokens count 0, 1, 2, … (left padding gets 0)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def prompt(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The prompt as int64 (batch, tokens) arrays of one shape, at least one token."""
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    if ids.ndim != 2 or mask.shape != ids.shape or ids.shape[1] == 0:
        raise InvalidInputError(
            f"input_ids {ids.shape} and attention_mask {mask.shape} must both be (batch, tokens), tokens ≥ 1"
        )
    return ids, mask


def argmax(logits: np.ndarray) -> np.ndarray:
    """The greedy choice: each row's highest logit (the first of equal ones), (B, V) -> (B,)."""
    return logits.argmax(axis=-1)


def tokens(
    step: Step, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int, pick=argmax, ends=()
) -> Iterator[np.ndarray]:
    """Decoding through ``step``: the prompt in one call, then one token per call; each new
    column of ids (B,) as it is chosen by ``pick(logits (B, V)) -> ids (B,)``. ``ends``: end
    ids; decoding stops once every row has made one (rows that ended go on in lockstep)."""
    ids, prompt_mask = prompt(input_ids, attention_mask)
    batch, length = ids.shape
    if max_new_tokens <= 0:
        return
    mask = np.ones((batch, length + max_new_tokens), np.int64)  # generated tokens are never padding
    mask[:, :length] = prompt_mask
    logits = step(ids, prompt_mask, positions(prompt_mask))
    first = prompt_mask.sum(axis=1, keepdims=True)  # (B, 1): each row's next position
    stops = np.asarray(sorted(set(ends)), np.int64)
    done = np.zeros(batch, bool)
    for k in range(max_new_tokens):
        new = np.asarray(pick(logits), np.int64).reshape(batch, 1)  # (B, 1)
        yield new[:, 0]
        done |= np.isin(new[:, 0], stops)
        if (stops.size and done.all()) or k == max_new_tokens - 1:
            return
        logits = step(new, mask[:, : length + k + 1], first + k)


def greedy(
    step: Step, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int, ends=()
) -> np.ndarray:
    """Greedy decoding through ``step`` (``tokens``): the new ids (B, max_new_tokens), fewer
    columns when every row has made one of ``ends`` (``until_end`` pads and measures them)."""
    ids, mask = prompt(input_ids, attention_mask)
    columns = list(tokens(step, ids, mask, max_new_tokens, argmax, ends))
    return np.stack(columns, axis=1) if columns else np.zeros((ids.shape[0], 0), np.int64)


def until_end(new: np.ndarray, ends, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``new`` up to and with its first end id, the rest ``pad``; and each row's
    length (as Hugging Face's ``generate`` returns a batch that stopped)."""
    new = new.copy()
    hit = np.isin(new, np.asarray(sorted(set(ends)), np.int64))
    lengths = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, new.shape[1])
    new[np.arange(new.shape[1])[None, :] >= lengths[:, None]] = pad
    return new, lengths.astype(np.int64)


def teacher_forced(step: Step, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The logits of every position (B, T, V), one token per call through ``step``: the path
    generation takes after its prompt pass. A padded position's logits are finite but not
    meaningful (its query attends to padding only, or to the row's tokens so far)."""
    ids, mask = prompt(input_ids, attention_mask)
    pos = positions(mask)
    rows = [step(ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1]).copy() for t in range(ids.shape[1])]
    return np.stack(rows, axis=1)


def empty_past(batch: int, layers: int, heads: int, head_dim: int, dtype: type) -> dict[str, np.ndarray]:
    """A zero-length self-attention cache: the first call of a cached decoder."""
    z = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
    return {f"past_key_values.{i}.{k}": z for i in range(layers) for k in KV}


def next_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A growing cache's next inputs: each ``present.*`` output as ``past_key_values.*``."""
    return {
        k.replace("present.", "past_key_values.", 1): v
        for k, v in outputs.items()
        if k.startswith("present.")
    }


class Growing:
    """The growing-cache strategy: ``run(feeds) -> {output: array}`` is fed the new tokens with the
    cache of the tokens before them (and ``fixed``: an encoder-decoder's encoder outputs and mask;
    a decoder whose positions come from its own count, ``causal=False``, gets no mask or
    positions). ``outputs``: the last call's outputs, its ``present.*`` the final cache."""

    def __init__(self, run, batch: int, shape: tuple[int, int, int], fixed: dict | None = None, causal=True):
        self.run, self.fixed, self.causal = run, fixed or {}, causal
        self.past = empty_past(batch, *shape, np.float32)
        self.outputs: dict[str, np.ndarray] = {}

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, **self.past, **self.fixed}
        if self.causal:
            feeds |= {"attention_mask": mask, "position_ids": pos}
        self.outputs = self.run(feeds)
        self.past = next_past(self.outputs)
        return self.outputs["logits"][:, -1]
