"""Session-scoped artifacts for the pipeline tests: tiny model dirs, adapters, ONNX exports,
and the few ways tests change a copy of one (``edit_json``, ``edit_tensors``, ``to_pickle``).

Exports cost seconds each (the dynamo exporter), so each is made once per test session and
shared; tests that change an artifact copy it first.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraexport.lora.adapter import PICKLE_NAME, WEIGHTS_NAME, Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import inject, lora_layers
from loraexport.lora.layer import LoRALinear
from loraexport.models.reference import SPECIALS, save_model
from loraexport.models.transformer import Transformer, TransformerConfig
from loraexport.stages.export import export

VOCAB = SPECIALS + list("0123456789")
B_STD = 0.3  # LoRA B values: large enough that the adapter visibly changes every output
# onnxruntime vs torch float32 on a width-16 model: a handful of roundings on O(1) logits.
ORT_ATOL = 1e-5


def tiny_config(**overrides) -> TransformerConfig:
    """d_model 16, 2 heads, one layer per stack: milliseconds per forward pass."""
    kw = dict(
        vocab=list(VOCAB), d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1, max_len=32
    )
    return TransformerConfig(**(kw | overrides))


def make_base(directory: Path, seed: int = 0, **overrides) -> Path:
    """A saved tiny reference model (``tiny_config`` with two decoder layers) in ``directory``."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True)
    save_model(Transformer(tiny_config(**({"n_decoder_layers": 2} | overrides))).eval(), directory)
    return directory


def make_adapter(base_dir: Path, directory: Path, seed: int = 1, **config) -> Path:
    """An adapter with non-zero B (B is zero-initialised: merging it would prove nothing)."""
    from loraexport.models.reference import load_model

    model = load_model(base_dir)
    cfg = LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]} | config))
    inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * B_STD)
    directory.mkdir(parents=True)
    Adapter.from_model(model, cfg).save(directory)
    return directory


def random_lora_linear(
    in_f: int, out_f: int, r: int, scaling: float, seed: int, dtype: torch.dtype = torch.float32
) -> LoRALinear:
    """A ``LoRALinear`` whose W0, bias, A and B are all drawn from N(0, 1) under ``seed``
    (B is zero-initialised: a layer left so would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g))
        base.bias.copy_(torch.randn(out_f, generator=g))
    layer = LoRALinear(base, r, scaling)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(r, in_f, generator=g))
        layer.lora_B.copy_(torch.randn(out_f, r, generator=g))
    return layer


@pytest.fixture(scope="session")
def seq2seq_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("s2s") / "base")


@pytest.fixture(scope="session")
def seq2seq_adapter(seq2seq_base, tmp_path_factory) -> Path:
    return make_adapter(seq2seq_base, tmp_path_factory.mktemp("s2s-adapter") / "adapter")


@pytest.fixture(scope="session")
def causal_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("causal") / "base", n_encoder_layers=0)


@pytest.fixture(scope="session")
def causal_adapter(causal_base, tmp_path_factory) -> Path:
    return make_adapter(causal_base, tmp_path_factory.mktemp("causal-adapter") / "adapter", seed=2)


@pytest.fixture(scope="session")
def seq2seq_onnx(seq2seq_base, seq2seq_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s2s-onnx") / "onnx"
    export(seq2seq_base, out, adapter=seq2seq_adapter)
    return out


@pytest.fixture(scope="session")
def causal_onnx(causal_base, causal_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("causal-onnx") / "onnx"
    export(causal_base, out, adapter=causal_adapter)
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def random_batch(batch: int, seq: int, seed: int = 0, seq2seq: bool = True) -> dict[str, torch.Tensor]:
    """Digit ids (VOCAB's 4..13), an all-ones mask and, for seq2seq, decoder ids: (batch, seq) each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(VOCAB), (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if seq2seq:
        out["decoder_input_ids"] = torch.randint(4, len(VOCAB), (batch, seq), generator=g)
    return out


def edit_json(path: Path, change: Callable[[object], object] | None = None, **updates) -> None:
    """Rewrite the JSON file ``path``: ``change(data)`` returns the new value, or ``updates``
    are set on the object."""
    data = json.loads(path.read_text())
    data = change(data) if change is not None else data | updates
    path.write_text(json.dumps(data))


def edit_tensors(adapter: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """``edit(tensors)`` changes the adapter's safetensors file in place."""
    tensors = load_file(str(adapter / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(adapter / WEIGHTS_NAME))


def to_pickle(adapter: Path, obj: object = None) -> dict[str, torch.Tensor]:
    """Replace the adapter's safetensors file by ``adapter_model.bin`` holding ``obj`` (default:
    the same tensors, pickled by ``torch.save``). Returns the tensors."""
    tensors = load_file(str(adapter / WEIGHTS_NAME))
    (adapter / WEIGHTS_NAME).unlink()
    torch.save(tensors if obj is None else obj, adapter / PICKLE_NAME)
    return tensors


# Tiny Hugging Face decoders (GPT-2, Llama, Qwen2) and PEFT adapters, for what applies to those
# families only (--optimize, onnxruntime-genai). GQA on Llama and Qwen2: 4 query heads, 2 kv.
HF_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    vocab_size=96,
    bos_token_id=1,
    eos_token_id=2,
)
# A decoder whose layers dominate its bytes (16 layers of 512 wide, a 1000-token vocabulary): ~205 MB
# of float32 weights, for the tests that bound memory by a multiple of the weights.
MEMORY_MODEL = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=16,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=1000,
    max_position_embeddings=256,
)
HF_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}


def make_hf_decoder(directory: Path, kind: str, seed: int = 0, **overrides) -> nn.Module:
    """A random ``kind`` decoder saved by transformers in ``directory``; returned in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = HF_DECODER | overrides
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=cfg["num_hidden_layers"],
            n_embd=cfg["hidden_size"],
            n_head=cfg["num_attention_heads"],
            n_positions=cfg["max_position_embeddings"],
            vocab_size=cfg["vocab_size"],
            bos_token_id=cfg["bos_token_id"],
            eos_token_id=cfg["eos_token_id"],
        )
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, pad_token_id=0))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    model.eval().save_pretrained(directory)
    return model


def make_peft_adapter(model: nn.Module, directory: Path, kind: str, seed: int = 1) -> nn.Module:
    """A PEFT r=4 adapter on ``HF_TARGETS[kind]`` with random B (saved by PEFT itself); the PEFT
    model (base + branches, unmerged) is returned for comparisons."""
    import peft

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS[kind]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)
    lora.save_pretrained(directory)
    return lora.eval()


# Tiny Hugging Face bases with a tokenizer, for ``train``: a word-level tokenizer (words w0..w39
# after the special tokens) that adds what the real one adds: nothing (GPT-2), BOS (Llama),
# [CLS] ... [SEP] (BERT).
TRAIN_WORDS = 40
TOKENIZERS = {
    "gpt2": (["<pad>", "<s>", "</s>", "<unk>"], None, dict(bos_token="<s>", eos_token="</s>")),
    "llama": (
        ["<pad>", "<s>", "</s>", "<unk>"],
        "<s> $A",
        dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
    ),
    "bert": (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        "[CLS] $A [SEP]",
        dict(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"),
    ),
    "roberta": (  # <pad> at 1: RoBERTa's pad_token_id
        ["<s>", "<pad>", "</s>", "<unk>"],
        "<s> $A </s>",
        dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", cls_token="<s>", sep_token="</s>"),
    ),
}


def word_tokenizer(kind: str):
    """A transformers fast tokenizer of whitespace-separated words for ``TOKENIZERS[kind]``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials, template, tokens = TOKENIZERS[kind]
    words = specials + [f"w{i}" for i in range(TRAIN_WORDS)]
    unk = next(s for s in specials if "unk" in s.lower())
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        used = [(s, specials.index(s)) for s in specials if s in template]
        tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=unk, **tokens)


def make_hf_train_base(directory: Path, kind: str, seed: int = 0, num_labels: int = 2) -> Path:
    """``kind`` ("gpt2", "llama": ``make_hf_decoder``; "bert", "roberta": a sequence
    classifier with ``num_labels``) saved with its ``word_tokenizer`` in ``directory``."""
    import transformers

    if kind in ("bert", "roberta"):
        torch.manual_seed(seed)
        small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        small |= dict(vocab_size=HF_DECODER["vocab_size"], num_labels=num_labels)
        if kind == "bert":
            model = transformers.BertForSequenceClassification(
                transformers.BertConfig(**small, max_position_embeddings=128)
            )
        else:  # positions start after the pad id (1): two more
            model = transformers.RobertaForSequenceClassification(
                transformers.RobertaConfig(**small, max_position_embeddings=130, pad_token_id=1)
            )
        model.eval().save_pretrained(directory)
    else:
        make_hf_decoder(directory, kind, seed)
    word_tokenizer(kind).save_pretrained(directory)
    return directory
