"""What the Hugging Face families share: transformers quieted, a model directory checked and
loaded (local files only, never remote code), cache dimensions, random parity batches.

The config is checked before anything is allocated: its values (``checks.check_hf_config``),
then the model it describes, built on the meta device (no storage), against the checkpoint's
safetensors headers (``checks.check_hf_checkpoint``: every tensor, by name), then the real load,
whose own report of missing and unused tensors must agree (``strict.check_loaded``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraexport.core.untrusted import read_json, short_repr
from loraexport.errors import ModelFormatError, first_line
from loraexport.models.base import Inputs, ParityCase
from loraexport.models.checks import (
    check_hf_checkpoint,
    check_hf_depth,
    check_hf_shapes,
    check_token_ids,
    checkpoint_tensors,
    hf_value,
    read_checked_config,
)
from loraexport.models.strict import check_loaded
from loraexport.models.types import ROBERTA

# Positions a model must have: the decoder export traces a 4-token cache plus 3 new tokens, the
# encoder export 5 tokens, and parity runs batches as long as the model allows.
MIN_POSITIONS = 8
MAX_REASON = 300  # characters of a transformers exception quoted in an error (it may quote values)
# TorchScript: 19 s against the dynamo exporter's 135 s on SmolLM2-135M (MEASURED.md); the
# pipeline exports three graphs (merged, base, unmerged), so this decides whether a 135M
# model takes one minute or seven. `--exporter dynamo` gives the smaller graph.
EXPORTER = "torchscript"

logging.getLogger("transformers").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_transformers():
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


def build_errors() -> tuple[type[BaseException], ...]:
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


def reason(e: BaseException) -> str:
    """One line from a transformers exception: its first line, or for its validators' errors
    (a heading, then the reason indented below) both; cut short, as it may quote a value."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else first_line(e)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


# ---- checking and loading a directory -----------------------------------------------------------
def read_config(directory: Path):
    """``(raw config.json, transformers config)``: its values checked, then read by transformers."""
    import transformers

    path = directory / "config.json"
    raw = read_checked_config(path)
    config_class = transformers.CONFIG_MAPPING[raw["model_type"]]
    with quiet_transformers():
        check_hf_shapes(raw, config_class(), path)
    try:
        with quiet_transformers():
            config = config_class.from_dict(dict(raw))
    except build_errors() as e:
        raise ModelFormatError(f"{path}: transformers cannot read it: {reason(e)}") from e
    return raw, config


def _model_class(raw: dict[str, Any], encoder: bool):
    import transformers

    if not encoder:
        return transformers.AutoModelForCausalLM
    archs = raw.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


def _build_options(cls, tensors) -> dict[str, Any]:
    """A bare encoder exports ``last_hidden_state`` only: built without a pooler when the
    checkpoint holds none (a masked-LM checkpoint such as roberta-base), rather than with a
    random one that strict loading refuses as missing."""
    import transformers

    bare = cls is transformers.AutoModel
    return {"add_pooling_layer": False} if bare and not any("pooler." in n for n in tensors) else {}


def _check(directory: Path, encoder: bool, supplied: Collection[str]):
    """The config of ``directory`` (``read_config``), then the model it describes, built on the
    meta device, against the checkpoint's headers (``supplied``: what the caller provides in
    place of the checkpoint), then ``generation_config.json``. Returns the transformers config,
    the model class to load, its build options (``_build_options``) and how the checkpoint's
    names map onto the model's."""
    raw, config = read_config(directory)
    path = directory / "config.json"
    cls = _model_class(raw, encoder)
    tensors = checkpoint_tensors(directory)
    options = _build_options(cls, tensors)
    text = config.get_text_config(decoder=True)
    check_hf_depth(hf_value(raw, text, "num_hidden_layers")[0], text.num_hidden_layers, tensors, path)
    try:
        with quiet_transformers(), torch.device("meta"):
            meta = cls.from_config(copy.deepcopy(config), attn_implementation="eager", **options)
    except build_errors() as e:
        raise ModelFormatError(
            f"{path}: transformers cannot build the model it describes: {reason(e)}"
        ) from e
    names = check_hf_checkpoint(meta, tensors, path, supplied)
    if max_positions(text) < MIN_POSITIONS:
        key, value = hf_value(raw, text, "max_position_embeddings")
        raise ModelFormatError(
            f"{path}: {key} {value} leaves {max_positions(text)} positions; the export needs "
            f"at least {MIN_POSITIONS}"
        )
    _check_generation_config(directory)
    return config, cls, options, names


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
            with quiet_transformers():
                GenerationConfig.from_dict(dict(raw)).to_json_string()
        except build_errors() as e:
            raise ModelFormatError(f"{path}: transformers cannot read it: {reason(e)}") from e


def load(directory: Path, encoder: bool, supplied: Collection[str] = ()) -> nn.Module:
    """The model of ``directory``, checked (``_check``), in eval mode and float32. ``supplied``:
    tensors or modules the caller provides itself (an adapter's modules_to_save, a head trained
    from scratch), which the checkpoint may lack (``strict``); the rest comes from it."""
    config, cls, options, names = _check(directory, encoder, supplied)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                str(directory),
                config=config,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.float32,
                attn_implementation="eager",
                output_loading_info=True,
                **options,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFormatError(f"{directory}: transformers cannot load it: {first_line(e)}") from e
    check_loaded(info, f"{directory}: the checkpoint does not match config.json", names, supplied)
    model.config.use_cache = not encoder
    return model.eval()


def save(model: nn.Module, directory: Path) -> None:
    with quiet_transformers():
        model.save_pretrained(str(directory), safe_serialization=True)


# ---- shapes -------------------------------------------------------------------------------------
def max_positions(config) -> int:
    """Positions a sequence may use: RoBERTa numbers them from ``pad_token_id + 1``."""
    n = getattr(config, "max_position_embeddings", None) or 2**31
    if config.model_type == ROBERTA:
        n -= (config.pad_token_id or 0) + 1
    return n


def end_token_ids(*values) -> list[int]:
    """Every end-of-sequence id of ``values`` (``eos_token_id`` of generation_config.json, then of
    config.json: an id, a list of ids, or None), in that order, each once."""
    out: list[int] = []
    for v in values:
        for t in v if isinstance(v, list | tuple) else [v]:
            if isinstance(t, int) and not isinstance(t, bool) and t not in out:
                out.append(t)
    return out


def generation_eos(model_dir: Path):
    """``eos_token_id`` of ``model_dir/generation_config.json`` (None without the file or key):
    what transformers puts in ``model.generation_config``, read without building the model."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return None
    cfg = read_json(path, ModelFormatError)
    return cfg.get("eos_token_id") if isinstance(cfg, dict) else None


def text_config(model: nn.Module):
    return model.config.get_text_config(decoder=True)


def cache_dims(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the KV cache."""
    c = text_config(model)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv, head_dim


# ---- random batches -----------------------------------------------------------------------------
def random_case(model: nn.Module, batch: int, seq: int, rng: torch.Generator, pad: str) -> ParityCase:
    """Random token ids (B, T); rows after the first ``pad``ded ("left", "right") to random lengths."""
    vocab = text_config(model).vocab_size
    seq = min(seq, max_positions(text_config(model)))
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


def random_cases(model: nn.Module, shapes: list[tuple[int, int, str]], n: int, seed: int) -> list[ParityCase]:
    """``n`` cases cycling through ``shapes`` of (batch, length, padding)."""
    rng = torch.Generator().manual_seed(seed)
    return [random_case(model, b, s, rng, pad) for b, s, pad in (shapes[i % len(shapes)] for i in range(n))]


def latency_inputs(model: nn.Module, batch: int, seq: int) -> Inputs:
    return random_case(model, batch, seq, torch.Generator().manual_seed(0), "none").inputs
