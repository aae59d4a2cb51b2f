"""A tiny example to serve: a random Llama with a byte-level BPE tokenizer (printable ASCII, so
every token is whole text), a chat template, and two PEFT LoRA adapters with random B, saved as
a user has them. Seconds on a CPU; needs torch, transformers and peft (the dev install).

    python samples/app/make_example.py runs/example   # → base/, adapter-a/, adapter-b/

The weights are random: the text it generates is noise, the same noise in every client.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

CORPUS = [
    "The capital of France is Paris.",
    "Once upon a time, in a small village, there lived a baker.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "The three primary colours are red, yellow and blue.",
]
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
VOCAB = 160
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
ADAPTERS = {"adapter-a": 1, "adapter-b": 2}  # name: seed of its B


def tokenizer():
    """A byte-level BPE of VOCAB tokens over printable ASCII (Ġ is the space, Ċ the newline)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + ["Ġ", "Ċ"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tk.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make(out: Path) -> None:
    import peft
    import torch
    import transformers

    tok = tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, vocab_size=len(tok),
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    for name, seed in ADAPTERS.items():
        lora = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        )
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in sorted(lora.named_parameters()):
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        lora.save_pretrained(out / name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a new folder")
    make(parser.parse_args().out)
