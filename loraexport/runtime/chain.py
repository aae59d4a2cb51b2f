"""A full forward through an export's graphs, whatever runs them: onnxruntime sessions
(``runtime.model.OnnxModel``) or the torch modules that were exported (``loraexport.verify``).
numpy only."""

from __future__ import annotations

import numpy as np

from loraexport.runtime.decode import empty_past, positions


def chain_forward(
    run,
    kind: str,
    shape: tuple[int, int, int],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    decoder_input_ids: np.ndarray | None = None,
    dtype: type = np.float32,
) -> dict[str, np.ndarray]:
    """A full forward through the exported graphs, whatever runs them.

    ``run(graph, feeds) -> {output: array}`` is an onnxruntime session here, or the torch
    modules that were exported (``loraexport.verify``), so both sides chain graphs alike.
    Each ``run`` takes from ``feeds`` only the inputs its graph declares.
    """
    input_ids = input_ids.astype(np.int64)
    mask = attention_mask.astype(np.int64)
    if kind == "encoder":
        feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return {f"model.{k}": v for k, v in run("model", feeds).items()}
    past = empty_past(input_ids.shape[0], *shape, dtype)
    if kind == "seq2seq":
        enc = run("encoder", {"input_ids": input_ids, "attention_mask": mask})
        cross = {k: v for k, v in enc.items() if k.startswith("encoder_key_values.")}
        dec = run(
            "decoder",
            {
                "input_ids": decoder_input_ids.astype(np.int64),
                "encoder_attention_mask": mask,
                **past,
                **cross,
            },
        )
        return {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in dec.items()}}
    feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions(mask), **past}
    return {f"model.{k}": v for k, v in run("model", feeds).items()}
