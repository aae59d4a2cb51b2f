"""Hugging Face transformers models as ``ModelFamily``s: decoders with a KV cache, encoders.

Decoders (GPT-2, Llama, Mistral, Qwen2) export one ``model.onnx``:
  input_ids (B,T), attention_mask (B,P+T), position_ids (B,T), past_key_values.{i}.key/value
  (B,KV,P,Dh) → logits (B,T,V), present.{i}.key/value (B,KV,P+T,Dh)
(the names Optimum and onnxruntime-genai use), for the prompt (P = 0) and each new token.
Encoders (BERT, RoBERTa) export ``model.onnx``: input_ids, attention_mask[, token_type_ids] →
last_hidden_state, or logits with a classification head.

transformers is imported lazily; models load from local files only, never remote code.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from loraexport.errors import ModelFormatError
from loraexport.export.spec import GraphSpec
from loraexport.models.base import Inputs, ModelFamily, ParityCase
from loraexport.models.checks import (
    check_hf_checkpoint,
    check_hf_config,
    check_hf_depth,
    check_hf_shapes,
    check_token_ids,
    check_tokenizer_config,
    checkpoint_tensors,
    hf_value,
)
from loraexport.runtime import first_line
from loraexport.untrusted import read_json, short_repr

CAUSAL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
ENCODER_TYPES = ("bert", "roberta")
TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
)
NEW_TOKENS = 32  # greedy tokens compared per prompt
# Positions a model must have: the decoder export traces a 4-token cache plus 3 new tokens, the
# encoder export 5 tokens, and parity runs batches as long as the model allows.
MIN_POSITIONS = 8
# A tokenizer file (tokenizer.json, vocab, merges, sentencepiece model) larger than this is not
# read: the largest real ones are ~35 MB (Gemma's tokenizer.json), and transformers holds a
# parsed copy several times the file's size.
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
MAX_REASON = 300  # characters of a transformers exception quoted in an error (it may quote values)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs and warns freely; the CLI shows its own output only."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _build_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises on a config it cannot build, past ``checks.check_hf_config``:
    its strict dataclass validation (huggingface_hub's own exception class) and whatever a
    model's ``__init__`` runs into (an unknown activation, a padding index outside a table)."""
    errors: tuple[type[BaseException], ...] = (
        TypeError,
        ValueError,
        ArithmeticError,  # ZeroDivisionError, OverflowError
        LookupError,  # KeyError, IndexError
        AttributeError,
        RuntimeError,  # RecursionError, NotImplementedError, torch's own
        AssertionError,  # nn.Embedding's padding_idx check
    )
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: transformers raises TypeError/ValueError then
        return errors
    return (*errors, StrictDataclassError)


def _reason(e: BaseException) -> str:
    """One line from a transformers exception: its first line, or for its validators' errors
    (a heading, then the reason indented below) both; cut short, as it may quote a value."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else first_line(e)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def _model_class(raw: dict[str, Any], encoder: bool):
    import transformers

    if not encoder:
        return transformers.AutoModelForCausalLM
    archs = raw.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


def _check(directory: Path, encoder: bool):
    """The config of ``directory``, checked before anything is allocated: its values
    (``checks.check_hf_config``), then the model it describes, built on the meta device (no
    storage), against the checkpoint's safetensors headers (``checks.check_hf_checkpoint``),
    then the tokenizer. Returns the transformers config and the model class to load."""
    import transformers

    path = directory / "config.json"
    raw = read_json(path, ModelFormatError)
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    check_hf_config(raw, path)
    cls = _model_class(raw, encoder)
    config_class = transformers.CONFIG_MAPPING[raw["model_type"]]
    with _quiet_transformers():
        check_hf_shapes(raw, config_class(), path)
    try:
        with _quiet_transformers():
            config = config_class.from_dict(dict(raw))
    except _build_errors() as e:
        raise ModelFormatError(f"{path}: transformers cannot read it: {_reason(e)}") from e
    tensors = checkpoint_tensors(directory)
    text = config.get_text_config(decoder=True)
    check_hf_depth(hf_value(raw, text, "num_hidden_layers")[0], text.num_hidden_layers, tensors, path)
    try:
        with _quiet_transformers(), torch.device("meta"):
            meta = cls.from_config(copy.deepcopy(config), attn_implementation="eager")
    except _build_errors() as e:
        raise ModelFormatError(
            f"{path}: transformers cannot build the model it describes: {_reason(e)}"
        ) from e
    check_hf_checkpoint(meta, tensors, path)
    if _max_positions(text) < MIN_POSITIONS:
        key, value = hf_value(raw, text, "max_position_embeddings")
        raise ModelFormatError(
            f"{path}: {key} {value} leaves {_max_positions(text)} positions; the export needs "
            f"at least {MIN_POSITIONS}"
        )
    load_tokenizer(directory, text.vocab_size)
    _check_generation_config(directory)
    return config, cls


def _load(directory: Path, encoder: bool) -> nn.Module:
    config, cls = _check(directory, encoder)
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(
                str(directory),
                config=config,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.float32,
                attn_implementation="eager",
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = first_line(e)
        raise ModelFormatError(f"{directory}: transformers cannot load it: {first}") from e
    model.config.use_cache = not encoder
    return model.eval()


def _max_positions(config) -> int:
    """Positions a sequence may use: RoBERTa numbers them from ``pad_token_id + 1``."""
    n = getattr(config, "max_position_embeddings", None) or 2**31
    if config.model_type == "roberta":
        n -= (config.pad_token_id or 0) + 1
    return n


def _check_generation_config(directory: Path) -> None:
    """``generation_config.json``, when there is one: transformers reads its token ids into
    the model, and the runtime metadata takes the end-of-sequence id from it."""
    path = directory / "generation_config.json"
    if path.is_file():
        raw = read_json(path, ModelFormatError)
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{path}: expected a JSON object, got {short_repr(raw)}")
        check_token_ids(raw, path)
        from transformers import GenerationConfig

        try:  # what from_pretrained does with it, so that a failure there names this file
            with _quiet_transformers():
                GenerationConfig.from_dict(dict(raw)).to_json_string()
        except _build_errors() as e:
            raise ModelFormatError(f"{path}: transformers cannot read it: {_reason(e)}") from e


# ---- tokenizer ----------------------------------------------------------------------------------
def load_tokenizer(directory: Path, vocab_size: int):
    """The tokenizer of a model directory, checked, or None when it has no
    ``tokenizer_config.json`` (generation prompts are then random token ids).

    Refused: files over ``MAX_TOKENIZER_BYTES``, a ``tokenizer_config.json`` with values of the
    wrong type, a tokenizer transformers cannot load, and one with more tokens than the model's
    embedding table (another model's tokenizer: its ids would fail mid-verification).
    """
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    raw = read_json(path, ModelFormatError)
    check_tokenizer_config(raw, path)
    model_config = read_json(directory / "config.json", ModelFormatError)
    for where, cfg in ((path, raw), (directory / "config.json", model_config)):
        if isinstance(cfg, dict) and cfg.get("tokenizer_class") is not None:
            _check_tokenizer_class(cfg["tokenizer_class"], where)
    for name in TOKENIZER_FILES[1:]:
        f = directory / name
        if f.is_file() and f.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ModelFormatError(
                f"{f}: {f.stat().st_size:,} bytes, over the {MAX_TOKENIZER_BYTES:,} loraexport reads "
                "for a tokenizer file"
            )
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
            if len(tok) > vocab_size:  # some text would get an id past the embedding table
                raise ModelFormatError(
                    f"the tokenizer has {len(tok)} tokens, more than the model's vocab_size {vocab_size}"
                )
            _encode(tok, DEFAULT_PROMPTS, vocab_size)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from e
    # The tokenizers library raises plain Exception for a malformed tokenizer.json, and
    # transformers' tokenizer classes whatever their __init__ hits (AttributeError, TypeError,
    # RecursionError...): any failure to load the files is the files' fault.
    except Exception as e:
        raise ModelFormatError(f"{path}: transformers cannot load the tokenizer: {_reason(e)}") from e
    return tok


def _check_tokenizer_class(name: str, where: Path) -> None:
    """AutoTokenizer instantiates whatever class of transformers ``tokenizer_class`` names (in
    ``tokenizer_config.json``, else ``config.json``): a model class there builds that model
    with its default config (billions of parameters), ``AutoTokenizer`` recurses. Only
    subclasses of ``PreTrainedTokenizerBase`` pass; a name transformers does not know falls
    back to the generic fast tokenizer, as transformers does."""
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        cls = tokenizer_class_from_name(name)
    except Exception as e:  # a lazy import of the module that defines it failed
        raise ModelFormatError(
            f"{where}: tokenizer_class {short_repr(name)} cannot be loaded: {_reason(e)}"
        ) from e
    if cls is not None and (
        not isinstance(cls, type)
        or not issubclass(cls, PreTrainedTokenizerBase)
        or cls is PreTrainedTokenizerBase
    ):
        raise ModelFormatError(f"{where}: tokenizer_class {short_repr(name)} is not a tokenizer class")


def _encode(tok, texts: list[str] | tuple[str, ...], vocab_size: int) -> list[list[int]]:
    """Token ids of each text; every id must index the model's embedding table."""
    seqs = []
    for text in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < vocab_size)]
        if bad:
            raise ModelFormatError(
                f"the tokenizer gives token id {short_repr(bad[0])} for {short_repr(text)}, outside "
                f"the model's vocab_size {vocab_size}"
            )
        seqs.append(ids)
    return seqs


def _save(model: nn.Module, directory: Path) -> None:
    with _quiet_transformers():
        model.save_pretrained(str(directory), safe_serialization=True)


def _text_config(model: nn.Module):
    return model.config.get_text_config(decoder=True)


def _cache_dims(model: nn.Module) -> tuple[int, int, int]:
    c = _text_config(model)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv, head_dim


# ---- decoders -----------------------------------------------------------------------------------
class CausalGraph(nn.Module):
    """Flat tensors in and out; the ``DynamicCache`` is built inside ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        from transformers import DynamicCache

        pairs = [(past_flat[i], past_flat[i + 1]) for i in range(0, len(past_flat), 2)]
        cache = DynamicCache(ddp_cache_data=pairs)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **_cache_kwargs(self.model, cache),
        )
        present = [t for layer in _returned_cache(out).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _cache_kwargs(model: nn.Module, cache) -> dict[str, Any]:
    """transformers 5 renamed ``past_key_values`` to ``cache``; pass whichever forward takes."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _kv_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n) for kind in ("key", "value")]


def _causal_specs(model: nn.Module) -> list[GraphSpec]:
    n, kv, hd = _cache_dims(model)
    B, T, P = 2, 3, 4
    vocab = _text_config(model).vocab_size
    batch = Dim("batch", min=1, max=1024)
    seq, past, total = (
        Dim("seq", min=1, max=8192),
        Dim("past", min=0, max=8192),
        Dim("total", min=1, max=16384),
    )
    args = (
        torch.randint(0, vocab, (B, T)),
        torch.ones(B, P + T, dtype=torch.long),
        torch.arange(P, P + T).repeat(B, 1),
        *[torch.randn(B, kv, P, hd) for _ in range(2 * n)],
    )
    return [
        GraphSpec(
            name="model",
            module=CausalGraph(model),
            args=args,
            input_names=["input_ids", "attention_mask", "position_ids", *_kv_names("past_key_values", n)],
            output_names=["logits", *_kv_names("present", n)],
            dynamic_shapes=(
                {0: batch, 1: seq},
                {0: batch, 1: total},
                {0: batch, 1: seq},
                tuple({0: batch, 2: past} for _ in range(2 * n)),
            ),
        )
    ]


def _special_tokens(model: nn.Module) -> dict[str, int | None]:
    c = _text_config(model)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) or c.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    return {"bos": c.bos_token_id, "eos": eos, "pad": c.pad_token_id}


def _causal_meta(model: nn.Module) -> dict[str, Any]:
    n, kv, hd = _cache_dims(model)
    return {
        "kind": "causal",
        "model_type": model.config.model_type,
        "special_tokens": _special_tokens(model),
        "n_layers": n,
        "n_heads": kv,
        "head_dim": hd,
    }


def _random_case(model: nn.Module, batch: int, seq: int, rng: torch.Generator, pad: str) -> ParityCase:
    vocab = _text_config(model).vocab_size
    seq = min(seq, _max_positions(_text_config(model)))
    ids = torch.randint(0, vocab, (batch, seq), generator=rng)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad != "none" and batch > 1:
        for i in range(1, batch):
            n = int(torch.randint(1, seq, (1,), generator=rng))
            if pad == "left":
                mask[i, : seq - n] = 0
            else:
                mask[i, n:] = 0
    return ParityCase(f"b{batch}xs{seq}-{pad}", {"input_ids": ids, "attention_mask": mask}, mask.bool())


def _parity_cases(model: nn.Module, n: int, seed: int) -> list[ParityCase]:
    """Batch sizes 1, 2, 4; lengths 2 to 64; unpadded, left- and right-padded."""
    rng = torch.Generator().manual_seed(seed)
    shapes = [
        (1, 16, "none"),
        (4, 32, "left"),
        (2, 64, "right"),
        (1, 2, "none"),
        (4, 24, "right"),
        (2, 8, "left"),
    ]
    return [_random_case(model, b, s, rng, pad) for b, s, pad in (shapes[i % len(shapes)] for i in range(n))]


def _prompts(model: nn.Module, sources: list[str] | None, n: int, seed: int) -> list[tuple[Inputs, int]]:
    """Tokenised prompts (the given sources, else a few built-in ones) or, without a tokenizer,
    random token ids; batched by token length, so no prompt is padded. Prompts are cut so that
    prompt and new tokens fit the model's positions."""
    vocab = _text_config(model).vocab_size
    path = getattr(model, "_loraexport_dir", None) or getattr(model.config, "_name_or_path", None)
    tok = load_tokenizer(Path(path), vocab) if path and Path(path).is_dir() else None
    if tok is not None:
        try:
            seqs = [s for s in _encode(tok, list(sources or DEFAULT_PROMPTS), vocab) if s]
        except ModelFormatError as e:
            raise ModelFormatError(f"{Path(path) / 'tokenizer_config.json'}: {e}") from e
    else:
        rng = torch.Generator().manual_seed(seed)
        seqs = [
            torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=rng)),), generator=rng).tolist()
            for _ in range(min(n, 8))
        ]
    room = _max_positions(_text_config(model))
    new = min(NEW_TOKENS, room // 2)
    groups: dict[int, list[list[int]]] = {}
    for s in seqs:
        s = s[: room - new]
        groups.setdefault(len(s), []).append(s)
    out = []
    for _, group in sorted(groups.items()):
        ids = torch.tensor(group, dtype=torch.long)
        out.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, new))
    return out


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def _generate(model: nn.Module, inputs: Inputs, max_new: int) -> torch.Tensor:
    """Greedy decoding with transformers' own ``DynamicCache`` (the torch reference)."""
    from transformers import DynamicCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=_positions(mask),
        use_cache=True,
        **_cache_kwargs(model, cache),
    )
    new = []
    for step in range(max_new):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
        if step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=_positions(mask)[:, -1:],
            use_cache=True,
            **_cache_kwargs(model, _returned_cache(out)),
        )
    return torch.cat(new, dim=1)


def _latency_inputs(model: nn.Module, batch: int, seq: int) -> Inputs:
    return _random_case(model, batch, seq, torch.Generator().manual_seed(0), "none").inputs


# ---- encoders -----------------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )
        return (getattr(out, self.output),)


def _encoder_output(model: nn.Module) -> str:
    return (
        "logits"
        if model.config.architectures
        and any(a.endswith("ForSequenceClassification") for a in model.config.architectures)
        and hasattr(model, "classifier")
        else "last_hidden_state"
    )


def _encoder_specs(model: nn.Module) -> list[GraphSpec]:
    B, S = 2, 5
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=_max_positions(model.config))
    ids = torch.randint(0, model.config.vocab_size, (B, S))
    out = _encoder_output(model)
    return [
        GraphSpec(
            name="model",
            module=EncoderGraph(model, out),
            args=(ids, torch.ones(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=[out],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}),
        )
    ]


def _encoder_meta(model: nn.Module) -> dict[str, Any]:
    return {
        "kind": "encoder",
        "model_type": model.config.model_type,
        "output": _encoder_output(model),
        "special_tokens": {"pad": model.config.pad_token_id},
    }


def _encoder_cases(model: nn.Module, n: int, seed: int) -> list[ParityCase]:
    """Right-padded and unpadded batches (token_type_ids are fed as zeros by the runners)."""
    rng = torch.Generator().manual_seed(seed)
    shapes = [(1, 16, "none"), (4, 32, "right"), (2, 64, "right"), (1, 2, "none"), (4, 24, "right")]
    return [_random_case(model, b, s, rng, pad) for b, s, pad in (shapes[i % len(shapes)] for i in range(n))]


def _no_generation(model: nn.Module, inputs: Inputs, max_new: int) -> torch.Tensor:
    raise NotImplementedError("encoders do not generate")


def _load_causal(directory: Path) -> nn.Module:
    model = _load(directory, encoder=False)
    model._loraexport_dir = str(directory)
    return model


def _load_encoder(directory: Path) -> nn.Module:
    return _load(directory, encoder=True)


logging.getLogger("transformers").setLevel(logging.ERROR)

HF_CAUSAL = ModelFamily(
    name="hf-causal",
    detect=lambda cfg: cfg.get("model_type") in CAUSAL_TYPES,
    load=_load_causal,
    save=_save,
    graph_specs=_causal_specs,
    runtime_meta=_causal_meta,
    parity_cases=_parity_cases,
    prompts=_prompts,
    generate=_generate,
    latency_inputs=_latency_inputs,
    latency_points=((1, 16), (1, 128)),
    extra_files=TOKENIZER_FILES,
    # TorchScript: 19 s against the dynamo exporter's 135 s on SmolLM2-135M (MEASURED.md); the
    # pipeline exports three graphs (merged, base, unmerged), so this decides whether a 135M
    # model takes one minute or seven. `--exporter dynamo` gives the smaller graph.
    exporter="torchscript",
)

HF_ENCODER = ModelFamily(
    name="hf-encoder",
    detect=lambda cfg: cfg.get("model_type") in ENCODER_TYPES,
    load=_load_encoder,
    save=_save,
    graph_specs=_encoder_specs,
    runtime_meta=_encoder_meta,
    parity_cases=_encoder_cases,
    prompts=lambda model, sources, n, seed: [],
    generate=_no_generation,
    latency_inputs=_latency_inputs,
    latency_points=((1, 16), (1, 128), (8, 128)),
    extra_files=TOKENIZER_FILES,
    # TorchScript: 19 s against the dynamo exporter's 135 s on SmolLM2-135M (MEASURED.md); the
    # pipeline exports three graphs (merged, base, unmerged), so this decides whether a 135M
    # model takes one minute or seven. `--exporter dynamo` gives the smaller graph.
    exporter="torchscript",
)
