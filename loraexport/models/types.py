"""The one list of the Hugging Face model types loraexport handles, and what each path supports.
Every other module asks here (the architecture test holds that no other module spells them)."""

from __future__ import annotations

CAUSAL_TYPES = ("gpt2", "llama", "mistral", "qwen2")  # decoders (models.hf.causal)
ENCODER_TYPES = ("bert", "roberta")  # encoders (models.hf.encoder)
# the fused graph written from the weights (export.fused: --optimize, --stream) and the
# layer-streamed reference (verify.streamed): Llama-style decoders
FUSED_TYPES = ("llama", "mistral", "qwen2")
LAST_POSITION_TYPES = ("gpt2",)  # --optimize: the torch.onnx export, LM head on the last position
OPTIMIZED_TYPES = FUSED_TYPES + LAST_POSITION_TYPES
QWEN2 = "qwen2"  # q/k/v biases and sliding windows of its own (models.hf.decoder_config)
# onnxruntime-genai's model type for each (export.genai)
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "decoder"}
LLAMA = "llama"  # biases only under attention_bias / mlp_bias; no sliding window
GPT2 = "gpt2"  # one fused c_attn projection (models.hf.causal's default targets)
ROBERTA = "roberta"  # numbers positions after the padding id (models.checks, models.hf.common)
