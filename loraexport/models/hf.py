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
from loraexport.io import read_json
from loraexport.models.base import Inputs, ModelFamily, ParityCase
from loraexport.runtime import first_line

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


def _load(directory: Path, encoder: bool) -> nn.Module:
    import transformers

    cfg = read_json(directory / "config.json", ModelFormatError)
    archs = cfg.get("architectures") or []
    if encoder:
        cls = (
            transformers.AutoModelForSequenceClassification
            if any(a.endswith("ForSequenceClassification") for a in archs)
            else transformers.AutoModel
        )
    else:
        cls = transformers.AutoModelForCausalLM
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(
                str(directory),
                local_files_only=True,
                trust_remote_code=False,
                dtype=torch.float32,
                attn_implementation="eager",
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = first_line(e)
        raise ModelFormatError(f"{directory}: transformers cannot load it: {first}") from e
    model.config.use_cache = not encoder
    return model.eval()


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


def _tokenizer(model: nn.Module):
    path = getattr(model, "_loraexport_dir", None) or getattr(model.config, "_name_or_path", None)
    if not path or not (Path(path) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError):
            return None


def _prompts(model: nn.Module, sources: list[str] | None, n: int, seed: int) -> list[tuple[Inputs, int]]:
    """Tokenised prompts (the given sources, else a few built-in ones) or, without a tokenizer,
    random token ids; batched by token length, so no prompt is padded."""
    tok = _tokenizer(model)
    if tok is not None:
        texts = list(sources or DEFAULT_PROMPTS)
        seqs = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    else:
        rng = torch.Generator().manual_seed(seed)
        vocab = _text_config(model).vocab_size
        seqs = [
            torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=rng)),), generator=rng).tolist()
            for _ in range(min(n, 8))
        ]
    groups: dict[int, list[list[int]]] = {}
    for s in seqs:
        groups.setdefault(len(s), []).append(s)
    out = []
    for _, group in sorted(groups.items()):
        ids = torch.tensor(group, dtype=torch.long)
        out.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, NEW_TOKENS))
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
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=model.config.max_position_embeddings)
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
