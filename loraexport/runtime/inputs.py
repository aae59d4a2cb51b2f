"""A call's inputs to an export, checked before any onnxruntime call (``RuntimeInputError``, a
loraexport ``InvalidInputError`` and a ``ValueError``): integer ids of shape (batch, tokens) inside
the vocabulary, a 0/1 mask of their shape, no more tokens than the context. numpy only."""

from __future__ import annotations

import numpy as np

from loraexport.runtime.files import RuntimeInputError


def vocab_size(model: dict) -> int | None:
    """A description's vocabulary size: ``vocab_size``, or the reference's ``vocab`` list."""
    if isinstance(model.get("vocab_size"), int):
        return model["vocab_size"]
    return len(model["vocab"]) if isinstance(model.get("vocab"), list) else None


def token_ids(values, name: str, vocab: int | None, context: int | None) -> np.ndarray:
    """``values`` as (batch, tokens) int64 ids, each in ``[0, vocab)``, at most ``context`` tokens."""
    ids = np.asarray(values)
    if ids.dtype.kind not in "iu":
        raise RuntimeInputError(f"{name} must hold integer token ids, not {ids.dtype} values")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise RuntimeInputError(
            f"{name} must be (batch, tokens) with a token or more, not of shape {ids.shape}"
        )
    outside = (ids < 0) | (ids >= vocab) if isinstance(vocab, int) else ids < 0
    if outside.any():
        bad = int(ids[outside].flat[0])
        raise RuntimeInputError(f"{name} holds id {bad}, outside the vocabulary [0, {vocab or '…'})")
    if isinstance(context, int) and ids.shape[1] > context:
        raise RuntimeInputError(f"{name} holds {ids.shape[1]} tokens; the model's context is {context}")
    return ids.astype(np.int64)


def checked_inputs(
    vocab: int | None, context: int | None, input_ids, attention_mask, decoder_input_ids=None
) -> tuple:
    """A call's inputs as int64 arrays, after refusing what the export cannot take: ids that are
    not integers, not (batch, tokens), or outside the vocabulary; a mask of another shape or with
    values other than 0 and 1; more tokens than the model's context."""
    ids = token_ids(input_ids, "input_ids", vocab, context)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise RuntimeInputError(f"attention_mask is {mask.shape}; it must be input_ids' shape {ids.shape}")
    if mask.dtype.kind not in "biuf" or (mask.size and not np.isin(mask, (0, 1)).all()):
        raise RuntimeInputError("attention_mask must hold 0 and 1 only")
    decoder = (
        None
        if decoder_input_ids is None
        else token_ids(decoder_input_ids, "decoder_input_ids", vocab, context)
    )
    return ids, mask.astype(np.int64), decoder
