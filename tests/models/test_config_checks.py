"""Model directories are checked before anything is allocated (models/checks.py).

One test per class of defect, through the real CLI (``loraexport inspect``: exit 3, one line
``error: ...`` naming the file, the key and the value, no traceback, the directory untouched),
and unit tests on the check functions. Hostile sizes (a width of 16384 or 65536, a context of
10**7 beside a few kilobytes of weights) must be refused with peak memory under 1 GB.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from artifacts import edit_json, make_base
from clihelp import needs_bin, ok, peak_rss_mb, refused, run, untouched
from safetensors.torch import load_file, save_file

from loraexport.errors import ModelFormatError
from loraexport.lora.stream import TensorInfo
from loraexport.models.checks import (
    check_hf_checkpoint,
    check_hf_config,
    check_state_shapes,
    check_tokenizer_config,
)
from loraexport.models.reference import POSITIONS_FLOOR, WEIGHTS, load_model

MAX_RSS_MB = 1024  # the bound for refusing a hostile config: 1 GB
VOCAB = 32  # the tiny Hugging Face models and their tokenizer


# ---- helpers ----------------------------------------------------------------------------------
def _inspect_refuses(d: Path, *needles: str) -> str:
    """``loraexport inspect d`` exits 3 with one line naming each needle; ``d`` is unchanged."""
    with untouched(d):
        return refused(run("inspect", d), 3, *needles)


def _hostile_size_refused_in_bounded_memory(d: Path) -> None:
    r, mb = peak_rss_mb("inspect", d)
    refused(r, 3)
    assert 10 < mb < MAX_RSS_MB, mb  # above 10 MB: the measurement saw the process


@pytest.fixture
def ref_dir(tmp_path) -> Path:
    return make_base(tmp_path / "ref", n_encoder_layers=1)


# ---- reference model --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, needles",
    [
        (dict(d_model=16384), ["'embed.weight' has shape [14, 16]", "config.json implies [14, 16384]"]),
        (dict(d_ff=16384), ["ff.fc1.weight' has shape [32, 16]", "implies [16384, 16]"]),
        (dict(n_decoder_layers=3), ["no tensor 'decoder.2."]),
        (dict(n_encoder_layers=0), ["unexpected tensor '"]),
    ],
    ids=["d_model", "d_ff", "more-layers", "fewer-layers"],
)
def test_reference_config_checked_against_the_weights_header(ref_dir, changes, needles):
    edit_json(ref_dir / "config.json", **changes)
    _inspect_refuses(ref_dir, f"{WEIGHTS} does not match config.json", *needles)


@pytest.mark.parametrize(
    "max_len, needle",
    [(10**7, "max_len must be an integer from 1 to 1048576, got 10000000"), (2**20, "position table")],
    ids=["over-the-bound", "more-than-the-weights"],
)
def test_reference_max_len_the_weights_do_not_justify(ref_dir, max_len, needle):
    """The position table is not stored: max_len × d_model must not exceed the weights (or a
    floor of POSITIONS_FLOOR values), so the real build after the check stays bounded."""
    edit_json(ref_dir / "config.json", max_len=max_len)
    _inspect_refuses(ref_dir, "config.json: max_len", needle)


def test_reference_long_context_of_a_small_model_is_fine(ref_dir):
    """Up to POSITIONS_FLOOR values of positions need no justification by the weights."""
    edit_json(ref_dir / "config.json", max_len=POSITIONS_FLOOR // 16)  # d_model 16
    assert load_model(ref_dir).pe.shape == (POSITIONS_FLOOR // 16, 16)


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(d_model="16"), "d_model must be an integer from 1 to 65536, got '16'"),
        (dict(d_model=16.0), "d_model must be an integer from 1 to 65536, got 16.0"),
        (dict(n_heads=True), "n_heads must be an integer from 1 to 65536, got True"),
        (dict(n_encoder_layers=True), "n_encoder_layers must be an integer from 0 to 256, got True"),
        (dict(n_decoder_layers=0), "n_decoder_layers must be an integer from 1 to 256, got 0"),
        (dict(n_decoder_layers=10**6), "n_decoder_layers must be an integer from 1 to 256"),
        (dict(d_ff=-1), "d_ff must be an integer from 1 to 262144, got -1"),
        (dict(dropout=True), "dropout must be a number in [0, 1), got True"),
        (dict(dropout=float("nan")), "dropout must be a number in [0, 1), got nan"),
        (dict(n_heads=3), "d_model 16 is not divisible by n_heads 3"),
        (dict(max_len=4), "max_len must be at least 8, got 4"),
        (dict(vocab=["a", "b"]), "vocab must be ['<pad>', '<bos>', '<eos>', '<sep>'] followed by"),
        (dict(vocab=["<pad>", "<bos>", "<eos>", "<sep>"]), "followed by at least one token"),
        (dict(vocab=["<pad>", "<bos>", "<eos>", "<sep>", "ab"] + list("123456789")), "token 'ab' is not one"),
        (
            dict(vocab=["<pad>", "<bos>", "<eos>", "<sep>", "1"] + list("123456789")),
            "lists '1' more than once",
        ),
        (dict(vocab=[1, 2]), "vocab must be a list of token strings, got [1, 2]"),
        (dict(model_type="x" * 10**5), "is not supported"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, str) else None,
)
def test_reference_config_values(ref_dir, changes, needle):
    edit_json(ref_dir / "config.json", **changes)
    line = _inspect_refuses(ref_dir, "config.json", needle)
    assert len(line) < 400  # hostile values are quoted short


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_reference_weights_of_a_non_float_dtype(ref_dir, dtype):
    tensors = load_file(str(ref_dir / WEIGHTS))
    tensors["decoder.0.self_attn.q.weight"] = tensors["decoder.0.self_attn.q.weight"].to(dtype)
    save_file(tensors, str(ref_dir / WEIGHTS))
    _inspect_refuses(ref_dir, WEIGHTS, "tensor 'decoder.0.self_attn.q.weight' is", "must be floating point")


def test_reference_half_precision_weights_load(ref_dir):
    tensors = {k: v.half() for k, v in load_file(str(ref_dir / WEIGHTS)).items()}
    save_file(tensors, str(ref_dir / WEIGHTS))
    model = load_model(ref_dir)
    assert model.embed.weight.dtype == torch.float32


def test_reference_parity_cases_stay_short_for_a_long_context(ref_dir):
    """Parity batches of 16 at max_len would need 16·H·max_len² attention scores."""
    from loraexport.models.reference_family import MAX_CASE_LEN, REFERENCE

    edit_json(ref_dir / "config.json", max_len=65536)  # 1M position values: under the floor
    model = load_model(ref_dir)
    lengths = [c.inputs["input_ids"].shape[1] for c in REFERENCE.parity_cases(model, 6, 0)]
    assert max(lengths) == MAX_CASE_LEN


@pytest.mark.slow
@needs_bin
@pytest.mark.parametrize(
    "changes", [dict(d_model=16384), dict(d_ff=16384), dict(max_len=10**7), dict(max_len=2**20)], ids=str
)
def test_hostile_reference_sizes_are_refused_in_bounded_memory(ref_dir, changes):
    edit_json(ref_dir / "config.json", **changes)
    _hostile_size_refused_in_bounded_memory(ref_dir)


# ---- check functions --------------------------------------------------------------------------
def _info(name: str, dtype: str, shape: list[int]) -> TensorInfo:
    return TensorInfo(name, dtype, shape, 0, math.prod(shape) * 4)


def test_check_state_shapes():
    expected = {"a": (2, 3), "b": (4,)}
    ok = [_info("a", "F32", [2, 3]), _info("b", "BF16", [4])]
    check_state_shapes(expected, ok, Path("m.safetensors"))
    cases = [
        ([_info("a", "F32", [2, 3])], "no tensor 'b' (1 missing)"),
        ([*ok, _info("c", "F32", [1])], "unexpected tensor 'c'"),
        ([_info("a", "F32", [3, 2]), ok[1]], "tensor 'a' has shape [3, 2], config.json implies [2, 3]"),
        ([_info("a", "I32", [2, 3]), ok[1]], "tensor 'a' is I32; model weights must be floating point"),
    ]
    for tensors, message in cases:
        with pytest.raises(ModelFormatError, match=re.escape(message)):
            check_state_shapes(expected, tensors, Path("m.safetensors"))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_size=True), "hidden_size must be an integer from 1 to 131072, got True"),
        (dict(n_embd="32"), "n_embd must be an integer"),
        (dict(num_hidden_layers=10**6), "num_hidden_layers must be an integer from 1 to 1024"),
        (dict(num_key_value_heads=0), "num_key_value_heads must be an integer"),
        (dict(max_position_embeddings=10**30), "max_position_embeddings must be an integer"),
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be a number from 0 to 1, got nan"),
        (dict(rope_theta="big"), "rope_theta must be a number"),
        (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
        (dict(eos_token_id=[1, "x"]), "eos_token_id must be a token id"),
        (dict(pad_token_id=1.5), "pad_token_id must be a token id"),
        (dict(architectures="GPT2LMHeadModel"), "architectures must be a list of class names"),
        (dict(hidden_act=["gelu"]), "hidden_act must be an activation's name"),
        (dict(rope_scaling=[1]), "rope_scaling must be an object or null"),
        # transformers 5 writes rope_theta inside rope_parameters: a negative one made a NaN graph
        (
            dict(rope_parameters={"rope_theta": -5.0}),
            "rope_parameters.rope_theta must be a number from 1e-06",
        ),
        (dict(rope_parameters={"rope_theta": 0}), "rope_parameters.rope_theta must be a number"),
        (
            dict(rope_parameters={"partial_rotary_factor": "x"}),
            "rope_parameters.partial_rotary_factor must be",
        ),
        (dict(rope_scaling={"factor": float("inf")}), "rope_scaling.factor must be a number"),
        (dict(partial_rotary_factor=2.0), "partial_rotary_factor must be a number from 1e-06 to 1"),
        (dict(quantization_config={"quant_method": "gptq"}), "quantization_config is set"),
        (dict(is_encoder_decoder=True), "is_encoder_decoder is true"),
    ],
    ids=lambda v: None,
)
def test_check_hf_config(changes, message):
    check_hf_config(
        {"model_type": "llama", "num_key_value_heads": None, "eos_token_id": [1, 2]}, Path("c.json")
    )
    with pytest.raises(ModelFormatError, match=re.escape(message)) as e:
        check_hf_config({"model_type": "llama", **changes}, Path("c.json"))
    assert str(e.value).startswith("c.json: ")


@pytest.mark.parametrize(
    "raw, message",
    [
        ([], "expected a JSON object"),
        ({"tokenizer_class": 5}, "tokenizer_class must be a class name, got 5"),
        ({"tokenizer_class": "a.b"}, "tokenizer_class must be a class name"),
        ({"bos_token": 5}, "bos_token must be a string, got 5"),
        ({"unk_token": {"a": 1}}, "unk_token must be a string"),
        ({"model_max_length": "x"}, "model_max_length must be a positive number"),
        ({"added_tokens_decoder": 5}, "added_tokens_decoder must be an object"),
    ],
)
def test_check_tokenizer_config(raw, message):
    check_tokenizer_config({"tokenizer_class": "GPT2Tokenizer", "bos_token": {"content": "<s>"}}, Path("t"))
    with pytest.raises(ModelFormatError, match=re.escape(message)):
        check_tokenizer_config(raw, Path("t"))


# ---- Hugging Face models ----------------------------------------------------------------------
try:
    import transformers
except ImportError:  # the `hf` extra
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

HF = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    ),
    "bert": lambda: transformers.BertModel(
        transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    ),
}


def _tokenizer(vocab_words: int = VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_words - 6)] + ["the", "of", "is"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny models saved by transformers (seeded); gpt2 with a tokenizer, the others without."""
    root = tmp_path_factory.mktemp("hf")
    for name, build in HF.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
    _tokenizer().save_pretrained(root / "gpt2")
    return {name: root / name for name in HF}


@pytest.fixture
def hf_copy(hf_dirs, tmp_path):
    return lambda name: Path(shutil.copytree(hf_dirs[name], tmp_path / name))


@needs_hf
def test_hf_seeds_load(hf_dirs):
    for d in hf_dirs.values():
        ok(run("inspect", d))


@needs_hf
@pytest.mark.parametrize(
    "name, changes, needles",
    [
        ("gpt2", dict(n_head=5), ["config.json: n_head 5 does not divide n_embd 16"]),
        ("gpt2", dict(n_head=0), ["config.json: n_head must be an integer from 1 to 4096, got 0"]),
        ("gpt2", dict(n_embd="16"), ["config.json: n_embd must be an integer", "got '16'"]),
        ("gpt2", dict(architectures=5), ["config.json: architectures must be a list of class names, got 5"]),
        ("gpt2", dict(activation_function="nope"), ["config.json: transformers cannot build the model"]),
        ("llama", dict(num_attention_heads=3), ["num_attention_heads 3 does not divide hidden_size 16"]),
        (
            "llama",
            dict(num_key_value_heads=3, num_attention_heads=4),
            ["num_key_value_heads 3 does not divide"],
        ),
        (
            "llama",
            dict(pad_token_id=500),
            ["pad_token_id 500 is not a token of the vocabulary (vocab_size 32)"],
        ),
        ("llama", dict(rope_scaling={"rope_type": "linear"}), ["config.json: transformers cannot read it"]),
        ("bert", dict(num_attention_heads=5), ["num_attention_heads 5 does not divide hidden_size 16"]),
        ("bert", dict(num_hidden_layers=10**6), ["num_hidden_layers must be an integer from 1 to 1024"]),
        ("bert", dict(max_position_embeddings=4), ["position_embeddings.weight' has shape [32, 16]"]),
        (
            "gpt2",
            dict(num_hidden_layers=1024),
            ["config.json: n_layer 1 and num_hidden_layers 1024 name the same"],
        ),
        ("llama", dict(max_position_embeddings=4), ["max_position_embeddings 4 leaves 4 positions"]),
    ],
    ids=lambda v: None,
)
def test_hf_config_values(hf_copy, name, changes, needles):
    d = hf_copy(name)
    edit_json(d / "config.json", **changes)
    _inspect_refuses(d, *needles)


@needs_hf
@pytest.mark.parametrize(
    "name, changes, needle",
    [
        (
            "gpt2",
            dict(n_embd=65536),
            "'transformer.h.0.attn.c_attn.bias' has shape [48], config.json implies [196608]",
        ),
        ("gpt2", dict(n_positions=10**7), "'transformer.wpe.weight' has shape [32, 16], config.json implies"),
        ("llama", dict(hidden_size=65536), "config.json implies"),
        ("llama", dict(intermediate_size=65536), "config.json implies"),
        ("bert", dict(vocab_size=10**7), "'embeddings.word_embeddings.weight' has shape [32, 16]"),
    ],
    ids=lambda v: None,
)
def test_hf_huge_sizes_beside_small_weights(hf_copy, name, changes, needle):
    d = hf_copy(name)
    edit_json(d / "config.json", **changes)
    _inspect_refuses(d, "model.safetensors does not match", needle)


@needs_hf
@pytest.mark.parametrize(
    "name, key", [("gpt2", "n_layer"), ("llama", "num_hidden_layers"), ("bert", "num_hidden_layers")]
)
def test_hf_more_layers_than_the_checkpoint_holds(hf_copy, name, key):
    """Refused from the header's names, before transformers builds 1024 layers (seconds, even
    on the meta device)."""
    d = hf_copy(name)
    edit_json(d / "config.json", **{key: 1024})
    _inspect_refuses(d, f"config.json: {key} is 1024 but the checkpoint holds the tensors of 1 layers")


@needs_hf
def test_hf_parameter_the_checkpoint_lacks(hf_copy):
    """A tensor the config implies but the checkpoint lacks: transformers would fill it with
    random values (and allocate it, however large). More cases: tests/models/test_strict_loading.py."""
    d = hf_copy("gpt2")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["transformer.h.0.mlp.c_fc.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _inspect_refuses(
        d, "the checkpoint does not match config.json", "no tensor 'transformer.h.0.mlp.c_fc.weight'"
    )


@needs_hf
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_hf_targeted_weight_of_a_non_float_dtype(hf_copy, dtype):
    d = hf_copy("gpt2")
    tensors = load_file(str(d / "model.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _inspect_refuses(d, f"tensor '{key}' is", "must be floating point")


@needs_hf
def test_hf_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "sharded"
    HF["llama"]().save_pretrained(d, max_shard_size="4KB")
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    ok(run("inspect", d))
    edit_json(d / "config.json", hidden_size=65536)
    _inspect_refuses(d, "model-0000", "does not match", "config.json implies")


@needs_hf
def test_hf_checkpoint_names_with_or_without_the_base_prefix(hf_dirs):
    """A BertModel checkpoint saved inside a classifier ('bert.' prefix) or the reverse."""
    with torch.device("meta"):
        model = HF["bert"]()
    path = Path("model.safetensors")
    plain = {n: (path, _info(n, "F32", list(p.shape))) for n, p in model.named_parameters()}
    prefixed = {f"bert.{n}": v for n, v in plain.items()}
    check_hf_checkpoint(model, plain, Path("config.json"))
    check_hf_checkpoint(model, prefixed, Path("config.json"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    prefixed[name] = (path, _info(name, "I32", [16, 16]))
    with pytest.raises(ModelFormatError, match=f"tensor '{name}' is I32"):
        check_hf_checkpoint(model, prefixed, Path("config.json"))
    buffers = {**plain, "embeddings.position_ids": (path, _info("embeddings.position_ids", "I64", [1, 32]))}
    check_hf_checkpoint(model, buffers, Path("config.json"))  # an integer buffer is fine


@needs_hf
@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(tokenizer_class=5), "tokenizer_class must be a class name, got 5"),
        (dict(tokenizer_class="AutoTokenizer"), "'AutoTokenizer' is not a tokenizer class"),  # recursion
        (
            dict(tokenizer_class="LlamaForCausalLM"),
            "'LlamaForCausalLM' is not a tokenizer class",
        ),  # 7B params
        (dict(bos_token=5), "bos_token must be a string, got 5"),
        (dict(added_tokens_decoder=5), "added_tokens_decoder must be an object"),
        (dict(model_max_length="x"), "model_max_length must be a positive number"),
    ],
    ids=lambda v: None,
)
def test_hf_broken_tokenizer_is_refused_at_load(hf_copy, changes, needle):
    d = hf_copy("gpt2")
    edit_json(d / "tokenizer_config.json", **changes)
    _inspect_refuses(d, "tokenizer_config.json: ", needle)


@needs_hf
def test_hf_tokenizer_class_in_the_model_config(hf_copy):
    """AutoTokenizer reads tokenizer_class from config.json when tokenizer_config.json has none."""
    d = hf_copy("gpt2")
    tok = json.loads((d / "tokenizer_config.json").read_text())
    del tok["tokenizer_class"]
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    edit_json(d / "config.json", tokenizer_class="BertModel")
    _inspect_refuses(d, "config.json: tokenizer_class 'BertModel' is not a tokenizer class")


@needs_hf
def test_hf_tokenizer_that_transformers_cannot_load(hf_copy):
    d = hf_copy("gpt2")
    (d / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    _inspect_refuses(d, "tokenizer_config.json: transformers cannot load the tokenizer")


@needs_hf
def test_hf_tokenizer_of_another_model(hf_copy):
    """Ids past the model's embedding table would fail mid-verification, after the export."""
    d = hf_copy("gpt2")
    _tokenizer(VOCAB * 4).save_pretrained(d)
    _inspect_refuses(
        d, "tokenizer_config.json: the tokenizer has 128 tokens, more than the model's vocab_size 32"
    )


@needs_hf
def test_hf_without_tokenizer_files_loads(hf_copy):
    d = hf_copy("gpt2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    ok(run("inspect", d))


@needs_hf
def test_hf_generation_config_token_ids(hf_copy):
    d = hf_copy("gpt2")
    edit_json(d / "generation_config.json", eos_token_id="x")
    _inspect_refuses(d, "generation_config.json: eos_token_id must be a token id (an integer), got 'x'")


@pytest.mark.slow
@needs_hf
@needs_bin
def test_hostile_hf_size_is_refused_in_bounded_memory(hf_copy):
    d = hf_copy("llama")
    edit_json(d / "config.json", hidden_size=65536)
    _hostile_size_refused_in_bounded_memory(d)
