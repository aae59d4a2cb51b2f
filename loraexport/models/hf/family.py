"""What every Hugging Face family shares: loading (checked, local files only), the tokenizer,
saving, latency inputs, the files copied beside the graph, and the exporter."""

from __future__ import annotations

from typing import Any

from loraexport.models.base import ModelFamily
from loraexport.models.hf.common import EXPORTER, latency_inputs, load, save
from loraexport.models.hf.tokenizer import TOKENIZER_FILES, model_tokenizer


def hf_family(name: str, model_types: tuple[str, ...], encoder: bool, **specific: Any) -> ModelFamily:
    """A ``ModelFamily`` for ``model_types``; ``specific``: the fields that differ (graphs,
    runtime facts, parity cases, prompts, generation, latency points)."""
    return ModelFamily(
        name=name,
        detect=lambda cfg: cfg.get("model_type") in model_types,
        load=lambda directory, supplied=(): load(directory, encoder=encoder, supplied=supplied),
        tokenizer=model_tokenizer,
        save=save,
        latency_inputs=latency_inputs,
        extra_files=TOKENIZER_FILES,
        exporter=EXPORTER,
        **specific,
    )
