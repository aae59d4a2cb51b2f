"""Run --optimize's decoder graphs, which compute the last position's logits only.

``generate_shared`` and ``forward_stepwise``: a fused graph (``loraexport.export.fused``) with one
shared KV buffer per layer. ``forward_growing``: a last-position graph whose cache grows.

GroupQueryAttention writes each step's keys and values in place when the same
``(batch, kv_heads, MAX, head_dim)`` OrtValue is bound as both ``past_key_values.{i}.key`` and
``present.{i}.key``; nothing is concatenated, in the graph or in numpy. ``attention_mask`` is as
wide as the tokens seen so far (not MAX): the graph reads its width as the total length::

    session = onnxruntime.InferenceSession("model.onnx", session_options(2))
    new_ids = generate_shared(session, input_ids, attention_mask, 16, cache_shape=(layers, kv, dim))

Prompts may be left-padded (positions count unmasked tokens only, as ``runtime.positions``).
Only numpy, onnxruntime and the standard library are imported (no torch).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from loraexport.errors import InvalidInputError
from loraexport.runtime.decode import (  # noqa: F401 (positions, empty_past, next_past: re-exported)
    KV,
    Growing,
    empty_past,
    greedy,
    next_past,
    positions,
    prompt,
    teacher_forced,
)


def _check_graph(session: ort.InferenceSession, cache_shape: tuple[int, int, int]) -> int:
    """The graph's vocabulary size, after checking it is a pruned graph with ``cache_shape``."""
    layers, kv_heads, head_dim = cache_shape
    inputs = {i.name: i.shape for i in session.get_inputs()}
    for i in range(layers):
        for k in KV:
            shape = inputs.get(f"past_key_values.{i}.{k}")
            if shape is None or shape[1] != kv_heads or shape[3] != head_dim:
                want = f"[batch, {kv_heads}, past, {head_dim}]"
                raise InvalidInputError(f"the graph's past_key_values.{i}.{k} is {shape}, not {want}")
    if f"past_key_values.{layers}.key" in inputs:
        raise InvalidInputError(f"the graph has more than the {layers} layers of cache_shape")
    logits = next((o.shape for o in session.get_outputs() if o.name == "logits"), None)
    if logits is None or len(logits) != 3 or logits[1] != 1 or not isinstance(logits[2], int):
        raise InvalidInputError(f"logits declared {logits}: not a last-position graph [batch, 1, vocab]")
    return logits[2]


class SharedCache:
    """An io-binding with each layer's ``(B, KV, MAX, D)`` buffer bound as past and present, and
    a ``(B, 1, V)`` logits buffer; ``step`` binds the small inputs and runs one call: the shared
    buffer strategy of ``runtime.decode``."""

    def __init__(
        self,
        session: ort.InferenceSession,
        batch: int,
        max_len: int,
        cache_shape: tuple[int, int, int],
        bound: dict[str, ort.OrtValue] | None = None,
    ) -> None:
        vocab = _check_graph(session, cache_shape)
        layers, kv_heads, head_dim = cache_shape
        self.session = session
        self.io = session.io_binding()
        # numpy arrays own the memory; the OrtValues wrap it (no copy), so reading an array reads
        # what the graph wrote in place
        self.cache: dict[str, np.ndarray] = {}
        for i in range(layers):
            for k in KV:
                buffer = np.zeros((batch, kv_heads, max_len, head_dim), np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{k}", value)
                self.io.bind_ortvalue_output(f"present.{i}.{k}", value)
                self.cache[f"present.{i}.{k}"] = buffer
        self.logits = np.zeros((batch, 1, vocab), np.float32)
        self.io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        # ``--mode adapter``: the active adapter's tensors bound to the graph's LoRA inputs (an
        # io-binding run does not apply the run options' adapters)
        for name, value in (bound or {}).items():
            self.io.bind_ortvalue_input(name, value)

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Run ``ids`` (B, S) with ``mask`` (B, total) and ``pos`` (B, S); returns logits (B, V),
        a view of the bound buffer (the next step overwrites it).

        onnxruntime reads an input as a C-contiguous block: a column slice of a wider array (the
        mask buffer's first T columns, when B > 1) is copied here, a contiguous one is not.
        """
        feeds = {
            "input_ids": np.ascontiguousarray(ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(pos, dtype=np.int64),
        }
        for name, array in feeds.items():
            self.io.bind_cpu_input(name, array)
        self.session.run_with_iobinding(self.io)  # ``feeds`` keeps the inputs alive until here
        return self.logits[:, 0]


def generate_shared(
    session: ort.InferenceSession,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    max_new_tokens: int,
    cache_shape: tuple[int, int, int],
    bound: dict[str, ort.OrtValue] | None = None,
    ends=(),
) -> np.ndarray:
    """Greedy decoding through one shared buffer per layer; new ids (B, max_new_tokens), fewer
    when every row has made one of ``ends`` (``runtime.decode.greedy``).

    The buffers hold MAX = prompt length + ``max_new_tokens`` positions, allocated once. The
    prompt runs in one call (no past), then one token per call. Rows keep decoding after their
    end token (lockstep); cut each row at its first end token.
    """
    ids, prompt_mask = prompt(input_ids, attention_mask)
    batch, prompt_len = ids.shape
    if max_new_tokens <= 0:
        return np.zeros((batch, 0), np.int64)
    cache = SharedCache(session, batch, prompt_len + max_new_tokens, cache_shape, bound)
    return greedy(cache.step, ids, prompt_mask, max_new_tokens, ends)


def forward_stepwise(
    session: ort.InferenceSession,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    cache_shape: tuple[int, int, int],
    bound: dict[str, ort.OrtValue] | None = None,
) -> dict[str, np.ndarray]:
    """Teacher-forced run, one token per call through the shared buffers (the path generation
    takes after its prompt pass).

    Returns ``logits`` (B, T, V), each step's last-position logits stacked, and
    ``present.{i}.key|value`` (B, KV, T, D), the buffers after the last step. Left- or
    right-padded masks: positions count unmasked tokens (``runtime.positions``); a padded
    position's values are finite but not meaningful (its query attends to padding only, or to
    the row's tokens so far).
    """
    ids, mask = prompt(input_ids, attention_mask)
    cache = SharedCache(session, *ids.shape, cache_shape, bound)
    logits = teacher_forced(cache.step, ids, mask)
    return {"logits": logits, **{name: buffer.copy() for name, buffer in cache.cache.items()}}


def forward_growing(run, input_ids: np.ndarray, mask: np.ndarray, shape: tuple[int, int, int]) -> dict:
    """``forward_stepwise`` for a last-position graph whose cache grows (present = past + new):
    ``run(feeds) -> {output: array}`` is fed token t with the cache of tokens < t; the logits of
    every position and the final cache, as one pass without a cache gives them."""
    growing = Growing(run, input_ids.shape[0], shape)
    logits = teacher_forced(growing.step, input_ids, mask)
    return {"logits": logits, **{k: v for k, v in growing.outputs.items() if k != "logits"}}
