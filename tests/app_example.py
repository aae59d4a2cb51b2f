"""The example that samples/app serves (``samples/app/make_example.py``: a tiny Llama with a
byte-level BPE tokenizer, a chat template and two PEFT adapters), and the reference of every
text test on it: PEFT's unmerged model generating greedily, its ids decoded by transformers'
tokenizer (``skip_special_tokens=True``), as an app using transformers would print them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAKE = REPO / "samples" / "app" / "make_example.py"
APP = REPO / "samples" / "app" / "app.py"
PROMPT = "The capital of France is"
NEW_TOKENS = 24
# Prepended to a child's code: importing any of these raises ImportError there (an app's install).
BLOCK_TORCH = "import sys\nfor _m in ('torch', 'transformers', 'peft'):\n    sys.modules[_m] = None\n"


def make_example(out: Path) -> Path:
    """``out``/base, adapter-a, adapter-b (``samples/app/make_example.py``)."""
    spec = importlib.util.spec_from_file_location("make_example", MAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(out)
    return out


def peft_greedy(base: Path, adapter: Path, prompt: str | list, new_tokens: int, chat: bool = False):
    """PEFT's greedy ids after ``prompt`` (``generate`` with the base's generation_config.json:
    it stops at any of its end ids, and keeps the one it stops at) and the text of those before
    the end id (an end token is no text; a real model's are special tokens, which decoding
    leaves out anyway)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(prompt)["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    new = out[0, len(ids) :].tolist()
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends])
    text = new[:-1] if new and new[-1] in ends else new
    return new, tokenizer.decode(text, skip_special_tokens=True)


def set_end_ids(base: Path, ends: list[int]) -> None:
    """The base's generation_config.json lists ``ends`` as its end ids."""
    path = base / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(config | {"eos_token_id": ends}))


def run_without_torch(
    code: str, *args: str, stdin: str = "", timeout: float = 300
) -> subprocess.CompletedProcess:
    """``code`` in a child Python where torch, transformers and peft cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
