"""Mutation fuzzer for loraexport's parsers of untrusted files.

Targets, each fed inputs mutated from valid seeds:

- ``safetensors``: a ``.safetensors`` file (truncation, byte flips, header length field, JSON
  mutations of dtype/shape/offsets/metadata) through ``lora.stream.read_header`` and
  ``io.load_safetensors``;
- ``index``: ``model.safetensors.index.json`` through ``lora.stream.checkpoint_shards``;
- ``config``: ``adapter_config.json`` text through ``io.read_json`` and ``LoraConfig.from_dict``,
  then every method the pipeline calls on an accepted config (rank, scaling, matches, to_dict);
- ``adapter``: an adapter directory (mutated config and/or tensors) through ``Adapter.load`` and,
  when it loads, ``Adapter.check_fits`` on a small model and ``merge_state_dict``;
- ``pickle``: ``adapter_model.bin`` through ``Adapter.load(allow_pickle=True)``;
- ``model``: a reference model directory's ``config.json`` through ``models.registry.load_model_dir``
  (the checks against the weights' header, then the load) and, when it loads, what the pipeline
  asks of the model (runtime metadata, graph specs, a forward pass per parity case, generation);
- ``hf_config``: the same for tiny GPT-2, Llama and BERT directories (``config.json``, sometimes
  ``generation_config.json``), when transformers is installed;
- ``tokenizer``: ``tokenizer_config.json`` of a tiny GPT-2 directory through
  ``models.hf.tokenizer.load_tokenizer`` and the tokenisation of a few prompts.

Only ``LoraExportError`` subclasses may escape a target. Any other exception (ValueError, KeyError,
TypeError, OverflowError, RecursionError, struct.error, ...) is a crash; so is a warning (turned
into an error: a value silently changed, say), an error message that is empty or spans several
lines, or a file-level error that does not name the file. Each distinct
crash (by exception type and raising line) is saved once under ``--crashes`` with its input and
traceback.

    python tests/fuzz/fuzz_parsers.py --inputs 100000 --seconds 600   # what `make fuzz` runs

Exit status: 0 when every requested input ran without a crash; 1 on a crash, or when the time
limit stopped the run before ``--inputs`` inputs (the reason is the last line, on stderr).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from loraexport.core.io import load_safetensors, read_json  # noqa: E402
from loraexport.errors import AdapterFormatError, LoraExportError, ModelFormatError  # noqa: E402
from loraexport.lora.adapter import CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME, Adapter  # noqa: E402
from loraexport.lora.config import _PASSIVE_KEYS, _VARIANT_KEYS, LoraConfig  # noqa: E402
from loraexport.lora.merge import merge_state_dict  # noqa: E402
from loraexport.lora.stream import INDEX, checkpoint_shards, read_header  # noqa: E402
from loraexport.models.checks import HF_FLOATS, HF_INTS, TOKEN_IDS, TOKENIZER_SPECIALS  # noqa: E402
from loraexport.models.reference import SPECIALS, save_model  # noqa: E402
from loraexport.models.registry import load_model_dir  # noqa: E402
from loraexport.models.transformer import Transformer, TransformerConfig  # noqa: E402

try:
    import transformers  # noqa: E402

    from loraexport.models.hf.common import quiet_transformers  # noqa: E402
    from loraexport.models.hf.tokenizer import encode, load_tokenizer  # noqa: E402
except ImportError:  # the `hf` extra is not installed: no Hugging Face targets
    transformers = None

REPO = Path(__file__).resolve().parents[2]
# Share of inputs per target: cheap byte-level parsers get most, Adapter.load (two files
# written and a model checked per input) fewer, torch.save + torch.load fewest.
WEIGHTS = {"safetensors": 40, "index": 10, "config": 30, "adapter": 18, "pickle": 2, "model": 6}
if transformers is not None:  # a model load by transformers takes ~20 ms, a tokenizer ~5 ms
    WEIGHTS |= {"hf_config": 2, "tokenizer": 2}
SLOW_INPUT_S = 2.0  # one input taking longer than this is reported (a parser that hangs)
MODULE_PATHS = ["blocks.0.q", "blocks.1.v", "blocks.0.o", "q", "blocks.10.attn.q", ""]
# A name on which a nested quantifier in a config regex ("(a+)+$") backtracks for seconds (2**27
# splits), so an accepted config with one is reported as a slow input, not hung on at length.
MODULE_PATHS += ["a" * 27 + ".q"]

# ---- random values ---------------------------------------------------------------------------
INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 16, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1]
INTERESTING_INTS += [2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 10**300]
INTERESTING_FLOATS = [0.0, -0.0, 0.5, 1.5, 1e-300, 1e308, -1e308, math.inf, -math.inf, math.nan]
INTERESTING_STRS = (
    "LORA none all lora_only F32 F16 BF16 I64 BOOL U8 F8_E4M3 U64 C64 X q v o layers blocks".split()
)
INTERESTING_STRS += ["", ".*", "(", ")", "[", "*", "(?P<", "\\", "a{99999999999}", "(a+)+$", "\x00", "\u00e9"]
INTERESTING_STRS += ["\ud800", "lora_A", "base_model.model.", "x" * 300]
INTERESTING_STRS += ["(a|aa)+", "(a*)*$", r"(\w+\.?)+x", ".*\\.(q|v)$", "q|" * 1001]  # regexes
KEY_POOL = (
    "r lora_alpha target_modules lora_dropout fan_in_fan_out bias use_rslora rank_pattern alpha_pattern "
    "layers_to_transform layers_pattern exclude_modules modules_to_save base_model_name_or_path task_type "
    "peft_type extra"
).split()
KEY_POOL += sorted(_VARIANT_KEYS) + sorted(_PASSIVE_KEYS) + ["dtype", "shape", "data_offsets", "__metadata__"]
# Keys and values of model configs (reference and Hugging Face) and tokenizer configs.
MODEL_KEYS = (
    [f.name for f in fields(TransformerConfig)] + sorted(HF_INTS) + sorted(HF_FLOATS) + list(TOKEN_IDS)
)
MODEL_KEYS += (
    "architectures model_type hidden_act activation_function rope_scaling rope_parameters dtype torch_dtype "
    "tie_word_embeddings is_decoder add_cross_attention is_encoder_decoder id2label label2id layer_types "
    "quantization_config use_sliding_window attention_bias mlp_bias partial_rotary_factor auto_map "
    "position_embedding_type problem_type pretraining_tp use_cache tokenizer_class"
).split()
TOKENIZER_KEYS = (
    list(TOKENIZER_SPECIALS)
    + (
        "tokenizer_class model_max_length added_tokens_decoder padding_side truncation_side chat_template "
        "clean_up_tokenization_spaces model_input_names auto_map backend add_bos_token add_eos_token "
        "additional_special_tokens extra_special_tokens do_lower_case tokenizer_file vocab_file"
    ).split()
)
MODEL_INTS = [0, 1, 2, 3, 5, 6, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 95, 96, 97, 128, 1024, 16384, 65536]
MODEL_INTS += [2**20, 2**24 + 1, 10**7, 2**31, 10**30, -1, -2]
MODEL_STRS = (
    "gpt2 llama mistral qwen2 bert roberta t5 loraexport-transformer gelu gelu_new silu relu nope linear "
    "dynamic yarn llama3 default float16 bfloat16 float32 int8 absolute relative_key full_attention "
    "sliding_attention GPT2LMHeadModel BertForSequenceClassification LlamaForCausalLM GPT2Tokenizer "
    "BertTokenizer LlamaTokenizer PreTrainedTokenizerFast TokenizersBackend AutoTokenizer T5Tokenizer "
    "CLIPTokenizer WhisperTokenizer XLNetTokenizer <s> </s> <unk> left right"
).split()
JSON_TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"NaN", b"-Infinity", b"1e999", b"null", b"true"]
JSON_TOKENS += [b'"\\ud800"', b"\\", b"\x00", b"\xff", b"\xef\xbb\xbf", b"-", b"0x10", b"1" * 5000]


# Every dtype safetensors can store, by item size: a dtype swapped within a group keeps the file's
# offsets valid, so the input reaches the code behind the header checks.
SAME_SIZE = [
    ["F64", "I64", "U64", "C64"],
    ["F32", "I32", "U32"],
    ["F16", "BF16", "I16", "U16"],
    ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2", "E8M0"],
]
CAST_DTYPES = [
    getattr(torch, name)
    for name in "float16 bfloat16 float64 int32 int64 bool uint8 int8 uint16 float8_e4m3fn float8_e5m2 "
    "complex64".split()
]


def rand_value(rng: random.Random, depth: int = 0):
    k = rng.randrange(10 if depth < 3 else 7)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice(INTERESTING_INTS) * rng.choice([1, 1, -1])
    if k == 3:
        return rng.randint(-5, 40)
    if k == 4:
        return rng.choice(INTERESTING_FLOATS)
    if k in (5, 6):
        return rng.choice(INTERESTING_STRS)
    if k == 7:
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if k == 8:
        return {
            rng.choice(KEY_POOL + INTERESTING_STRS): rand_value(rng, depth + 1)
            for _ in range(rng.randrange(4))
        }
    return [rng.randint(-2, 8) for _ in range(rng.randrange(4))]


def mutate_structure(rng: random.Random, obj, depth: int = 0):
    """A copy of a JSON value with one random change somewhere inside it."""
    if isinstance(obj, dict) and obj and (depth == 0 or rng.random() < 0.7):
        obj = dict(obj)
        key = rng.choice(list(obj))
        op = rng.randrange(6)
        if op == 0:
            del obj[key]
        elif op == 1:
            obj[rng.choice(KEY_POOL + INTERESTING_STRS)] = rand_value(rng)
        elif op == 2:
            obj[key] = rand_value(rng)
        elif op == 3:
            obj[key] = [obj[key]] if rng.random() < 0.5 else str(obj[key])
        else:
            obj[key] = mutate_structure(rng, obj[key], depth + 1)
        return obj
    if isinstance(obj, list) and obj:
        obj = list(obj)
        i = rng.randrange(len(obj))
        op = rng.randrange(5)
        if op == 0:
            del obj[i]
        elif op == 1:
            obj.insert(i, rand_value(rng))
        elif op == 2:
            obj[i] = rand_value(rng)
        else:
            obj[i] = mutate_structure(rng, obj[i], depth + 1)
        return obj
    if isinstance(obj, bool) or obj is None:
        return rand_value(rng)
    if isinstance(obj, int):
        return rng.choice([obj + 1, obj - 1, -obj, obj * 2, 0, obj + rng.randint(-64, 64), rand_value(rng)])
    return rand_value(rng)


def mutate_bytes(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    """Byte-level havoc: flips, random bytes, inserts, deletes, duplicates, truncation, tokens."""
    buf = bytearray(data)
    for _ in range(rounds or rng.choice([1, 1, 1, 2, 3, 8])):
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(n + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and n:
            i = rng.randrange(n)
            del buf[i : i + rng.randint(1, 16)]
        elif op == 4 and n:
            del buf[rng.randrange(n + 1) :]  # truncation
        elif op == 5 and n:
            i = rng.randrange(n)
            j = rng.randrange(n + 1)
            buf[j:j] = buf[i : i + rng.randint(1, 32)]
        elif op == 6:
            i = rng.randrange(n + 1)
            buf[i:i] = rng.choice(JSON_TOKENS)
        elif op == 7 and n:
            i = rng.randrange(n)
            buf[i : i + 1] = b"[" * rng.choice([50, 1000, 100_000])
        elif op == 8 and n:
            i = rng.randrange(n)
            buf[i : i + 4] = struct.pack(
                "<I", rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, rng.getrandbits(32)])
            )
    return bytes(buf)


def json_text(rng: random.Random, obj) -> bytes:
    """``obj`` as JSON bytes, sometimes in another encoding or with a deeply nested value."""
    text = json.dumps(obj, indent=rng.choice([None, 2]))
    r = rng.random()
    if r < 0.03:
        return text.encode("utf-16")
    if r < 0.06:
        return b"\xef\xbb\xbf" + text.encode()
    if r < 0.09:
        depth = rng.choice([200, 5000, 200_000])
        return text.replace(":", ": " + "[" * depth + "]" * depth + ', "_":', 1).encode()
    return text.encode("utf-8", "surrogatepass")


# ---- seeds ----------------------------------------------------------------------------------
def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None, d: Path) -> bytes:
    p = d / "seed.safetensors"
    save_file(tensors, str(p), metadata=metadata)
    return p.read_bytes()


def safetensors_seeds(d: Path) -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    return [
        _safetensors_bytes({"w": torch.randn(4, 3, generator=g)}, {"format": "pt"}, d),
        _safetensors_bytes(
            {
                "a": torch.randn(2, 3, generator=g).half(),
                "b": torch.randn(5, generator=g).bfloat16(),
                "c": torch.arange(6).reshape(2, 3),
                "d": torch.tensor([True, False, True]),
                "e": torch.zeros(0, 3),
                "f": torch.tensor(1.5, dtype=torch.float64),
                "g": torch.arange(4, dtype=torch.uint8),
                "h": torch.arange(4, dtype=torch.int8),
                "i": torch.arange(3, dtype=torch.int32),
                "j": torch.arange(3, dtype=torch.int16),
            },
            None,
            d,
        ),
    ]


@dataclass
class AdapterSeed:
    config: dict
    tensors: dict[str, torch.Tensor]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.v = nn.Linear(6, 4)
        self.o = nn.Linear(4, 6)


def small_model() -> nn.Module:
    model = nn.Module()
    model.blocks = nn.ModuleList([_Block(), _Block()])
    return model


def adapter_seeds() -> list[AdapterSeed]:
    g = torch.Generator().manual_seed(1)
    seeds = []
    for cfg in (
        {"r": 2, "lora_alpha": 4, "target_modules": ["q", "v"]},
        {
            "r": 3,
            "lora_alpha": 8,
            "target_modules": ".*\\.(q|v)",
            "use_rslora": True,
            "rank_pattern": {"v": 2},
        },
        {"r": 2, "lora_alpha": 2, "target_modules": ["q"], "bias": "all", "modules_to_save": ["o"]},
    ):
        config = LoraConfig(**cfg)
        tensors = {}
        model = small_model()
        for path, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and config.matches(path):
                r = config.rank(path)
                tensors[f"{PREFIX}{path}.lora_A.weight"] = torch.randn(r, mod.in_features, generator=g)
                tensors[f"{PREFIX}{path}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g)
                if config.bias != "none":
                    tensors[f"{PREFIX}{path}.base_layer.bias"] = torch.randn(mod.out_features, generator=g)
            elif isinstance(mod, nn.Linear) and config.saves_module(path):
                tensors[f"{PREFIX}{path}.modules_to_save.default.weight"] = mod.weight.detach().clone()
        seeds.append(AdapterSeed(config.to_dict(), tensors))
    return seeds


INDEX_SEED = {"metadata": {"total_size": 48}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file()}


def _hf_tokenizer():
    """A word-level tokenizer over 32 tokens, built in memory (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + ["the", "of", "is"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


HF_VOCAB = 32  # the tokenizer's 32 words


@functools.cache
def model_seeds() -> dict[str, dict[str, bytes]]:
    """The files of tiny model directories, by name; built once per process (seeded)."""
    seeds: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, layers in (("reference-s2s", 1), ("reference-causal", 0)):
            torch.manual_seed(0)
            cfg = TransformerConfig(
                vocab=SPECIALS + list("0123456789"),
                d_model=16,
                n_heads=2,
                d_ff=32,
                n_encoder_layers=layers,
                n_decoder_layers=1,
                max_len=16,
            )
            (Path(tmp) / name).mkdir()
            save_model(Transformer(cfg).eval(), Path(tmp) / name)
            seeds[name] = _files(Path(tmp) / name)
        if transformers is None:
            return seeds
        small = dict(vocab_size=HF_VOCAB, num_hidden_layers=1, max_position_embeddings=32)
        small |= dict(hidden_size=16, intermediate_size=32, num_attention_heads=2)
        builds = {
            "gpt2": lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(
                    vocab_size=HF_VOCAB,
                    n_embd=16,
                    n_layer=1,
                    n_head=2,
                    n_positions=32,
                    bos_token_id=1,
                    eos_token_id=2,
                )
            ),
            "llama": lambda: transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**small, num_key_value_heads=1)
            ),
            "bert": lambda: transformers.BertModel(transformers.BertConfig(**small)),
        }
        with quiet_transformers():
            for name, build in builds.items():
                torch.manual_seed(0)
                build().save_pretrained(Path(tmp) / name)
            _hf_tokenizer().save_pretrained(Path(tmp) / "gpt2")
        for name in builds:
            seeds[name] = _files(Path(tmp) / name)
    return seeds


# ---- mutators per target --------------------------------------------------------------------
def mutate_safetensors(rng: random.Random, seed: bytes) -> bytes:
    (n,) = struct.unpack("<Q", seed[:8])
    header, data = json.loads(seed[8 : 8 + n]), seed[8 + n :]
    r = rng.random()
    if r < 0.35:
        return mutate_bytes(rng, seed)
    if r < 0.5:  # the length field alone
        v = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(seed) - 8, len(seed) - 7, 100 * 2**20 + 1])
        v = rng.choice([v, rng.getrandbits(64), rng.getrandbits(16), 2**63, 2**64 - 1])
        return struct.pack("<Q", max(0, min(v, 2**64 - 1))) + seed[8:]
    if r < 0.6:  # another dtype of the same item size: a header that stays consistent
        names = [k for k in header if k != "__metadata__"]
        for name in rng.sample(names, rng.randint(1, len(names))):
            group = next(g for g in SAME_SIZE if header[name]["dtype"] in g)
            header[name]["dtype"] = rng.choice(group)
    else:
        for _ in range(rng.choice([1, 1, 2, 3])):
            header = mutate_structure(rng, header)
    raw = json_text(rng, header)
    if rng.random() < 0.3:
        raw = mutate_bytes(rng, raw, 1)
    raw += b" " * rng.choice([0, 0, -len(raw) % 8])
    length = len(raw) if rng.random() < 0.9 else len(raw) + rng.randint(-3, 3)
    tail = data if rng.random() < 0.8 else mutate_bytes(rng, data)
    return struct.pack("<Q", max(0, length)) + raw + tail


def mutate_config(rng: random.Random, seed: dict) -> bytes:
    r = rng.random()
    if r < 0.25:
        return mutate_bytes(rng, json.dumps(seed).encode())
    obj = seed
    for _ in range(rng.choice([1, 1, 2, 3])):
        obj = mutate_structure(rng, obj)
    if rng.random() < 0.1:
        obj = rand_value(rng)
    return json_text(rng, obj)


def model_value(rng: random.Random, old: object):
    """A value for a model or tokenizer config key: sizes around the seed's, sizes that do not
    fit the weights or memory, names of other classes, or anything ``rand_value`` makes."""
    r = rng.random()
    if r < 0.3 and isinstance(old, int) and not isinstance(old, bool):
        return rng.choice([old + 1, old - 1, old * 2, old // 2, -old, old + 16, 0])
    if r < 0.55:
        return rng.choice(MODEL_INTS)
    if r < 0.75:
        return rng.choice(MODEL_STRS)
    return rand_value(rng)


def mutate_model_json(rng: random.Random, seed: dict, keys: list[str]) -> bytes:
    """A config: known keys set to interesting values, structural mutations, or byte havoc."""
    if rng.random() < 0.15:
        return mutate_bytes(rng, json.dumps(seed).encode())
    obj = dict(seed)
    for _ in range(rng.choice([1, 1, 2, 3])):
        if rng.random() < 0.6:
            key = rng.choice(keys + list(obj))
            obj[key] = model_value(rng, obj.get(key))
        else:
            obj = mutate_structure(rng, obj)
    return json_text(rng, obj)


def mutate_tensors(rng: random.Random, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for _ in range(rng.choice([1, 1, 2])):
        if not out:
            out["x"] = torch.zeros(1)
        key = rng.choice(sorted(out))
        t = out[key]
        op = rng.randrange(11)
        if op == 0:
            del out[key]
        elif op == 1:
            new = key.replace(
                rng.choice(["lora_A", "lora_B", "blocks.0", "base_model.model.", ".weight"]),
                rng.choice(["lora_B", "lora_A", "blocks.7", "", ".default.weight", "..", "x"]),
                1,
            )
            out[new] = out.pop(key)
        elif op == 2:
            out[key] = t.T.contiguous() if t.ndim == 2 and rng.random() < 0.5 else t.reshape(-1)
        elif op == 3:
            out[key] = t[: max(0, t.shape[0] - 1)] if t.ndim else t.reshape(1)
        elif op == 4:
            out[key] = torch.randn(*[rng.randint(0, 7) for _ in range(rng.randint(0, 3))])
        elif op == 5:
            out[key] = t.to(rng.choice(CAST_DTYPES))
        elif op == 6 and t.numel() and t.is_floating_point():
            t = t.clone()
            t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf, 1e38])
            out[key] = t
        elif op == 7:
            out[
                f"{PREFIX}blocks.{rng.randint(0, 3)}.{rng.choice('qvo')}.{rng.choice(['bias', 'weight'])}"
            ] = t
        elif op == 8:
            out[key + rng.choice([".default", "x", ""])] = t.clone()
        elif op == 9:
            out[key] = t.unsqueeze(0)
        else:
            out[rng.choice(INTERESTING_STRS[1:]) or "y"] = t.clone()
    return {k: v.contiguous() for k, v in out.items()}


# ---- running one input ----------------------------------------------------------------------
class Finding(Exception):
    """An input whose handling broke the error contract without raising a foreign exception."""


def _check_message(e: LoraExportError, must_name: str | None) -> None:
    msg = str(e)
    if not msg.strip() or "\n" in msg.strip():
        raise Finding(f"{type(e).__name__} message is empty or not one line: {msg!r}")
    if must_name and must_name not in msg:
        raise Finding(f"{type(e).__name__} message does not name {must_name!r}: {msg!r}")


def exercise_config(config: LoraConfig) -> None:
    """What the pipeline does with an accepted config: none of it may fail on a foreign error."""
    for p in MODULE_PATHS:
        config.rank(p)
        config.alpha(p)
        if not math.isfinite(config.scaling(p)):
            raise Finding(f"accepted config gives a non-finite scaling for {p!r}")
        config.matches(p)
        config.saves_module(p)
    json.dumps(config.to_dict())


PROMPTS = ["", "the of is", "a\x00b \u00e9\ud7ff", "x" * 300, "<s></s><unk>", "\n\t "]


def exercise_model(d: Path) -> None:
    """What the pipeline asks of a loaded model: none of it may fail on a foreign error."""
    loaded = load_model_dir(d)
    family, model = loaded.family, loaded.model
    meta = family.runtime_meta(model)
    json.dumps(meta)
    family.graph_specs(model)
    with torch.no_grad():
        for case in family.parity_cases(model, 3, 0):
            model(**case.inputs)
        if meta["kind"] != "encoder":
            for inputs, n in family.prompts(model, loaded.tokenizer, None, 2, 0)[:2]:
                family.generate(model, inputs, min(n, 2))


def exercise_tokenizer(d: Path) -> None:
    tok = load_tokenizer(d, HF_VOCAB)
    if tok is not None:
        encode(tok, PROMPTS, HF_VOCAB)


@dataclass
class Stats:
    inputs: int = 0
    per_target: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # error class names
    crashes: dict = field(default_factory=dict)  # signature -> [count, saved dir, summary]
    skipped: int = 0  # inputs the generator could not write
    slowest: tuple = (0.0, "")

    def merge(self, other: Stats) -> None:
        self.inputs += other.inputs
        self.skipped += other.skipped
        self.per_target.update(other.per_target)
        self.accepted.update(other.accepted)
        self.errors.update(other.errors)
        for sig, (count, where, summary) in other.crashes.items():
            if sig in self.crashes:
                self.crashes[sig][0] += count
            else:
                self.crashes[sig] = [count, where, summary]
        self.slowest = max(self.slowest, other.slowest)


class Fuzzer:
    def __init__(self, seed: int, work: Path, crashes: Path) -> None:
        self.rng = random.Random(seed)
        self.work = work
        self.crash_dir = crashes
        self.stats = Stats()
        self.st_seeds = safetensors_seeds(work)
        self.adapter_seeds = adapter_seeds()
        self.model = small_model()
        self.state = self.model.state_dict()
        self.targets: dict[str, Callable[[], tuple[Callable[[], None], str | None, Path]]] = {
            "safetensors": self._safetensors,
            "index": self._index,
            "config": self._config,
            "adapter": self._adapter,
            "pickle": self._pickle,
            "model": self._model,
            "hf_config": self._hf_config,
            "tokenizer": self._tokenizer,
        }
        self.model_seeds = model_seeds()
        self.schedule = [t for t, w in WEIGHTS.items() for _ in range(w)]
        shard = work / "index"
        shard.mkdir()
        shutil.copy(work / "seed.safetensors", shard / INDEX_SEED["weight_map"]["w"])

    # Each target writes its input under self.work and returns (run, name the error must cite, input).
    def _safetensors(self):
        path = self.work / "model.safetensors"
        path.write_bytes(mutate_safetensors(self.rng, self.rng.choice(self.st_seeds)))

        def run():  # both readers of the same file; an error from the first does not stop the second
            failure = None
            for fn in (lambda: read_header(path), lambda: load_safetensors(path, ModelFormatError)):
                try:
                    fn()
                except LoraExportError as e:
                    _check_message(e, path.name)
                    failure = e
            if failure is not None:
                raise failure

        return run, path.name, path

    def _index(self):
        d = self.work / "index"
        (d / INDEX).write_bytes(mutate_config(self.rng, INDEX_SEED))
        return lambda: checkpoint_shards(d), INDEX, d / INDEX

    def _config(self):
        path = self.work / CONFIG_NAME
        path.write_bytes(mutate_config(self.rng, self.rng.choice(self.adapter_seeds).config))

        def run():
            exercise_config(LoraConfig.from_dict(read_json(path, AdapterFormatError)))

        return run, CONFIG_NAME, path

    def _adapter_dir(self) -> tuple[Path, AdapterSeed]:
        d = self.work / "adapter"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        seed = self.rng.choice(self.adapter_seeds)
        mutate_cfg = self.rng.random() < 0.3
        config = mutate_config(self.rng, seed.config) if mutate_cfg else json.dumps(seed.config).encode()
        (d / CONFIG_NAME).write_bytes(config)
        return d, seed

    def _adapter(self):
        d, seed = self._adapter_dir()
        r = self.rng.random()
        tensors = seed.tensors if r < 0.2 else mutate_tensors(self.rng, seed.tensors)
        save_file(tensors, str(d / WEIGHTS_NAME))
        if r < 0.2:
            p = d / WEIGHTS_NAME
            p.write_bytes(mutate_safetensors(self.rng, p.read_bytes()))

        def run():  # loaded, fitted, then merged: an accepted adapter must merge or fail cleanly
            adapter = Adapter.load(d)
            adapter.check_fits(self.model)
            merge_state_dict(self.state, [adapter])

        return run, None, d

    def _pickle(self):
        d, seed = self._adapter_dir()
        r = self.rng.random()
        obj: object = mutate_tensors(self.rng, seed.tensors)
        if r < 0.3:
            obj = rng_container(self.rng, obj)
        buf = io.BytesIO()
        torch.save(obj, buf)
        raw = buf.getvalue()
        (d / PICKLE_NAME).write_bytes(mutate_bytes(self.rng, raw) if 0.3 <= r < 0.6 else raw)

        def run():
            Adapter.load(d, allow_pickle=True).check_fits(self.model)

        return run, None, d

    def _model_dir(self, seed: str, name: str, keys: list[str]) -> Path:
        """A fresh copy of model directory ``seed`` with file ``name`` mutated."""
        d = self.work / "model"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        for f, data in self.model_seeds[seed].items():
            (d / f).write_bytes(mutate_model_json(self.rng, json.loads(data), keys) if f == name else data)
        return d

    def _model(self):
        d = self._model_dir(self.rng.choice(["reference-s2s", "reference-causal"]), "config.json", MODEL_KEYS)
        return lambda: exercise_model(d), "config.json", d / "config.json"

    def _hf_config(self):
        seed = self.rng.choice(["gpt2", "llama", "bert"])
        name = "generation_config.json" if seed == "gpt2" and self.rng.random() < 0.15 else "config.json"
        d = self._model_dir(seed, name, MODEL_KEYS)
        return lambda: exercise_model(d), name, d / name

    def _tokenizer(self):
        d = self._model_dir("gpt2", "tokenizer_config.json", TOKENIZER_KEYS)
        return lambda: exercise_tokenizer(d), "tokenizer_config.json", d / "tokenizer_config.json"

    # ---- the loop --------------------------------------------------------------------------
    def one(self) -> None:
        target = self.rng.choice(self.schedule)
        try:
            run, must_name, inp = self.targets[target]()
        except Exception:  # an input torch or safetensors cannot even write (a lone surrogate, ...)
            self.stats.skipped += 1
            return
        self.stats.inputs += 1
        self.stats.per_target[target] += 1
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():  # a warning is a finding too: data silently changed
                warnings.simplefilter("error")
                run()
            self.stats.accepted[target] += 1
        except LoraExportError as e:
            self.stats.errors[type(e).__name__] += 1
            try:
                _check_message(e, must_name)
            except Finding as f:
                self._crash(target, f, inp)
        except (Exception, RecursionError, MemoryError) as e:  # noqa: B014 - named for the reader
            self._crash(target, e, inp)
        dt = time.perf_counter() - t0
        if dt > self.stats.slowest[0]:
            self.stats.slowest = (dt, target)
        if dt > SLOW_INPUT_S:
            self._crash(target, Finding(f"one input took {dt:.1f} s"), inp)

    def _crash(self, target: str, e: BaseException, inp: Path) -> None:
        tb = traceback.extract_tb(e.__traceback__)
        ours = [f for f in tb if "loraexport" in f.filename and "fuzz" not in f.filename] or list(tb)
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        sig = f"{target}:{type(e).__name__}:{where}"
        if isinstance(e, Finding):
            sig += ":" + str(e)[:40]
        summary = f"{type(e).__name__} at {where}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if sig in self.stats.crashes:
            self.stats.crashes[sig][0] += 1
            return
        out = self.crash_dir / f"{target}-{hashlib.sha1(sig.encode()).hexdigest()[:10]}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if inp.is_dir():
            shutil.copytree(inp, out / inp.name)
        elif inp.exists():
            shutil.copy(inp, out / inp.name)
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        (out / "traceback.txt").write_text(f"target: {target}\n{text}", encoding="utf-8", errors="replace")
        self.stats.crashes[sig] = [1, str(out), summary]

    def run(self, inputs: int, deadline: float) -> Stats:
        while self.stats.inputs < inputs and time.monotonic() < deadline:
            self.one()
        return self.stats


def rng_container(rng: random.Random, tensors: dict) -> object:
    """Something torch.save can write that is not a flat dict of tensors."""
    return rng.choice(
        [
            list(tensors.values()),
            {i: t for i, t in enumerate(tensors.values())},
            {"state_dict": tensors},
            {k: (v if rng.random() < 0.7 else v.tolist()) for k, v in tensors.items()},
            {(k, 1) if rng.random() < 0.5 else k: v for k, v in tensors.items()},
            torch.zeros(3),
            None,
        ]
    )


def _worker(seed: int, inputs: int, deadline: float, crashes: str) -> Stats:
    torch.set_num_threads(1)
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="loraexport-fuzz-", dir=base))
    try:
        return Fuzzer(seed, work, Path(crashes)).run(inputs, deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fuzz(inputs: int, seconds: float, jobs: int = 1, seed: int = 0, crashes: Path | None = None) -> Stats:
    """Run ``inputs`` inputs (or until ``seconds`` pass) over ``jobs`` processes; return the stats."""
    crashes = crashes or REPO / "runs" / "fuzz" / "crashes"
    deadline = time.monotonic() + seconds
    shares = [inputs // jobs + (i < inputs % jobs) for i in range(jobs)]
    if jobs == 1:
        return _worker(seed, inputs, deadline, str(crashes))
    total = Stats()
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        # time.monotonic is system-wide on Linux, so the deadline holds in the workers too
        args = [(seed * 1000 + i, n, deadline, str(crashes)) for i, n in enumerate(shares)]
        for s in pool.starmap(_worker, args):
            total.merge(s)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs to run (default 100000)")
    ap.add_argument("--seconds", type=float, default=600, help="stop after this many seconds at most")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crashes", type=Path, default=REPO / "runs" / "fuzz" / "crashes")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    stats = fuzz(args.inputs, args.seconds, args.jobs, args.seed, args.crashes)
    dt = time.perf_counter() - t0
    rate = stats.inputs / dt
    print(f"fuzz: {stats.inputs} inputs in {dt:.1f} s ({rate:.0f}/s, {args.jobs} jobs, seed {args.seed})")
    for t in WEIGHTS:
        print(f"  {t:12s} {stats.per_target[t]:7d} inputs, {stats.accepted[t]:6d} accepted")
    print("  errors raised: " + ", ".join(f"{k} {v}" for k, v in stats.errors.most_common()))
    print(f"  slowest input: {stats.slowest[0] * 1000:.0f} ms ({stats.slowest[1]})")
    print(f"crashes: {sum(c for c, _, _ in stats.crashes.values())} ({len(stats.crashes)} distinct)")
    for sig, (count, where, summary) in sorted(stats.crashes.items()):
        print(f"  {count:6d}x {sig.split(':')[0]}: {summary}\n          saved in {where}")
    failures = []
    if stats.crashes:
        failures.append(f"crashes found ({len(stats.crashes)} distinct)")
    if stats.inputs < args.inputs:  # a fuzz run that did not run what it was asked proves less
        failures.append(
            f"ran {stats.inputs} of {args.inputs} inputs before the time limit ({args.seconds:g} s)"
        )
    if failures:
        print("fuzz: FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
