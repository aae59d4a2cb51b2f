"""``genai_config.json``: what onnxruntime-genai needs to load a decoder export as it is.

onnxruntime-genai 0.18 refuses any key it does not know, so only its own keys are written
(docs/notes/issue-13-research.md §1 lists them with their sources). Our graphs use its default
I/O names; they are written anyway, as documentation of the graph. ``model.type`` is the
Hugging Face ``model_type`` where genai knows it with separate key and value caches, else
``decoder`` (GPT-2: genai's ``gpt2`` type expects one combined cache tensor per layer).
``past_present_share_buffer`` is true only for a graph that updates one key/value buffer in
place (--optimize's fused graph); a plain export concatenates the cache.
"""

from __future__ import annotations

from typing import Any

from loraexport.artifact.schema import end_ids
from loraexport.models.types import GENAI_TYPES

GENAI_CONFIG = "genai_config.json"
# transformers 5 writes this tokenizer class; transformers 4.x (Optimum) cannot read it, and
# both they and onnxruntime-genai read the fast tokenizer's class under its older name.
NEW_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def supported(model_meta: dict[str, Any]) -> bool:
    """A decoder onnxruntime-genai can run: a Hugging Face causal model of a type it knows."""
    return model_meta.get("kind") == "causal" and model_meta.get("model_type") in GENAI_TYPES


def genai_config(model_meta: dict[str, Any], graph: dict[str, Any], filename: str = "model.onnx") -> dict:
    """The config for one decoder graph, from the export's description (``runtime_meta``) and
    the graph's I/O names."""
    tokens = model_meta.get("special_tokens", {})
    ends = end_ids(model_meta)  # every end id: genai stops at any of a list
    eos = ends[0] if len(ends) == 1 else ends or None
    context = int(model_meta["context_length"])
    decoder = {
        "filename": filename,
        "head_size": model_meta["head_dim"],
        "hidden_size": model_meta["hidden_size"],
        "num_attention_heads": model_meta["attention_heads"],
        "num_key_value_heads": model_meta["kv_heads"],
        "num_hidden_layers": model_meta["n_layers"],
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "inputs": {
            name: name for name in ("input_ids", "attention_mask", "position_ids") if name in graph["inputs"]
        }
        | {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    model: dict[str, Any] = {
        "type": GENAI_TYPES[model_meta["model_type"]],
        "context_length": context,
        "vocab_size": model_meta["vocab_size"],
        "decoder": decoder,
    }
    for key, value in (("bos_token_id", tokens.get("bos")), ("eos_token_id", eos)):
        if value is not None:
            model[key] = value
    pad = tokens.get("pad") if tokens.get("pad") is not None else (ends or [None])[0]  # else the first end id
    if pad is not None:
        model["pad_token_id"] = pad
    search = {
        "do_sample": False,
        "num_beams": 1,
        "max_length": context,
        "past_present_share_buffer": graph.get("kv_cache") == "shared-buffer",
    }
    return {"model": model, "search": search}


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` as transformers 4.x, Optimum and onnxruntime-genai read it:
    the fast tokenizer under its older class name."""
    cls = config.get("tokenizer_class")
    if isinstance(cls, str) and cls in NEW_TOKENIZER_CLASSES:
        return config | {"tokenizer_class": NEW_TOKENIZER_CLASSES[cls]}
    return config
