"""LoRA: config, layer, injection, adapter files and the merge math."""
