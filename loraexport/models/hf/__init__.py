"""Hugging Face transformers models as ``ModelFamily``s: decoders with a KV cache
(``causal``), encoders (``encoder``); what they share (``common``) and the tokenizer
(``tokenizer``).

transformers is imported lazily; models load from local files only, never remote code.
"""

from loraexport.models.hf.causal import HF_CAUSAL
from loraexport.models.hf.encoder import HF_ENCODER

__all__ = ["HF_CAUSAL", "HF_ENCODER"]
