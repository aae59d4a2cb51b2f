"""Loading, saving, tokenising and greedy decoding for the reference Transformer.

A model directory is ``config.json`` (``TransformerConfig``) + ``model.safetensors``.
Tokens are single characters from ``config.vocab``; ids 0-3 are ``<pad> <bos> <eos> <sep>``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loraexport.core.io import load_safetensors, require_dir, save_safetensors, write_json
from loraexport.core.untrusted import read_json, short_repr
from loraexport.errors import DataFormatError, ModelFormatError
from loraexport.models.checks import check_state_shapes, checkpoint_tensors
from loraexport.models.transformer import Transformer, TransformerConfig

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<sep>"]
MODEL_TYPE = "loraexport-transformer"
WEIGHTS = "model.safetensors"


# A position table (max_len × d_model, not stored: recomputed at load) may be as large as the
# weights together, or this many values (16 MB) for small models. A table beyond both is no
# model anyone trained (the paper's base: 512 × 512 positions beside 65M weights), and the check
# bounds what ``Transformer(config)`` allocates by the size of the checkpoint.
POSITIONS_FLOOR = 2**22
# The export traces a 4-token cache plus 3 new tokens (``reference_onnx.graph_specs``): 7
# positions; a shorter context cannot be exported (nor hold a prompt worth the name).
MIN_MAX_LEN = 8


def read_config(directory: Path) -> TransformerConfig:
    """``config.json`` of a model directory, every value checked (see ``TransformerConfig``)."""
    path = directory / "config.json"
    raw = read_json(path, ModelFormatError)
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        raise ModelFormatError(f"{path}: model_type is not {MODEL_TYPE!r}")
    try:
        config = TransformerConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{path}: {e}") from e
    if config.vocab[: len(SPECIALS)] != SPECIALS or config.vocab_size == len(SPECIALS):
        raise ModelFormatError(
            f"{path}: vocab must be {SPECIALS} followed by at least one token, got {short_repr(config.vocab)}"
        )
    chars = config.vocab[len(SPECIALS) :]
    if bad := next((t for t in chars if len(t) != 1), None):
        raise ModelFormatError(
            f"{path}: vocab token {short_repr(bad)} is not one character (tokens are characters)"
        )
    seen: set[str] = set()
    for t in chars:
        if t in seen:
            raise ModelFormatError(f"{path}: vocab lists {t!r} more than once")
        seen.add(t)
    if config.max_len < MIN_MAX_LEN:
        raise ModelFormatError(f"{path}: max_len must be at least {MIN_MAX_LEN}, got {config.max_len}")
    return config


def load_model(directory: str | Path) -> Transformer:
    """Read ``config.json`` + ``model.safetensors`` into a ``Transformer`` (strict), in eval mode.

    Nothing is allocated before the config has been checked against the checkpoint's header:
    the model is first built on the meta device (shapes, no storage) and its state dict compared
    with the header's names, shapes and dtypes (``checks.check_state_shapes``).
    """
    d = require_dir(directory, "model directory")
    config = read_config(d)
    weights = d / WEIGHTS
    if not weights.is_file():
        raise ModelFormatError(f"{WEIGHTS} not found in {d}")
    tensors = [t for _, t in checkpoint_tensors(d, [WEIGHTS]).values()]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    check_state_shapes(expected, tensors, weights)
    values = sum(math.prod(t.shape) for t in tensors)
    if config.max_len * config.d_model > max(values, POSITIONS_FLOOR):
        raise ModelFormatError(
            f"{d / 'config.json'}: max_len {config.max_len} needs a position table of "
            f"{config.max_len * config.d_model:,} values (max_len × d_model {config.d_model}), more than "
            f"the {values:,} weights in {WEIGHTS} (or {POSITIONS_FLOOR:,} for a small model)"
        )
    model = Transformer(config)
    state = load_safetensors(weights, ModelFormatError)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the header was checked: only a file changed meanwhile gets here
        first = str(e).strip().splitlines()
        raise ModelFormatError(f"{d / WEIGHTS} does not match config.json: {' '.join(first[:2])}") from e
    return model.eval()


def save_model(model: Transformer, directory: str | Path) -> None:
    d = Path(directory)
    write_json(d / "config.json", model.config.to_dict())
    save_safetensors(d / WEIGHTS, {k: v.detach().cpu() for k, v in model.state_dict().items()})


# ---- text ↔ ids --------------------------------------------------------------------------
class Vocab:
    def __init__(self, tokens: list[str]) -> None:
        if tokens[: len(SPECIALS)] != SPECIALS:
            raise ModelFormatError(f"vocab must start with {SPECIALS}, got {tokens[:4]}")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}

    def encode(self, text: str, where: str = "") -> list[int]:
        try:
            return [self.index[ch] for ch in text]
        except KeyError as e:
            raise DataFormatError(f"{where}character {e.args[0]!r} is not in the model's vocabulary") from e

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.tokens[i])
        return "".join(out)


def check_pairs(config: TransformerConfig, pairs: list[tuple[str, str]], where: str) -> None:
    """Every pair tokenises and fits ``max_len``; errors name the file and example (1-based,
    blank lines not counted)."""
    vocab = Vocab(config.vocab)
    extra = 2 if config.is_encoder_decoder else 3  # <eos> / <bos>…<eos>, or <bos> <sep> <eos>
    for n, (src, tgt) in enumerate(pairs, 1):
        vocab.encode(src, f"{where}: example {n}: source: ")
        vocab.encode(tgt, f"{where}: example {n}: target: ")
        longest = max(len(src), len(tgt)) + 1 if config.is_encoder_decoder else len(src) + len(tgt) + extra
        if longest > config.max_len:
            raise DataFormatError(
                f"{where}: example {n} needs {longest} positions but the model's max_len is {config.max_len}"
            )


def batch_encode(config: TransformerConfig, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Teacher-forcing tensors for (source, target) text pairs, right-padded.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (−100 where no loss) and, for an
    encoder-decoder, ``decoder_input_ids``.
    """
    vocab = Vocab(config.vocab)
    srcs = [vocab.encode(s) for s, _ in pairs]
    tgts = [vocab.encode(t) for _, t in pairs]
    if config.is_encoder_decoder:
        enc = [s + [EOS] for s in srcs]
        dec = [[BOS] + t for t in tgts]
        lab = [t + [EOS] for t in tgts]
        out = _pad(enc, PAD)
        out["decoder_input_ids"] = _pad(dec, PAD)["input_ids"]
        out["labels"] = _pad(lab, -100)["input_ids"]
        return out
    seqs, labels = [], []
    for s, t in zip(srcs, tgts, strict=True):
        prompt = [BOS] + s + [SEP]
        seqs.append(prompt + t)
        labels.append([-100] * (len(prompt) - 1) + t + [EOS])
    out = _pad(seqs, PAD)
    out["labels"] = _pad(labels, -100)["input_ids"]
    return out


def _pad(seqs: list[list[int]], value: int) -> dict[str, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def prompt_ids(config: TransformerConfig, sources: list[str]) -> dict[str, torch.Tensor]:
    """Inputs for generation: the source (enc-dec) or ``<bos> source <sep>`` (decoder-only).

    Decoder-only prompts must have equal length (callers group by length): positions are
    counted from the first token, so left padding would shift them.
    """
    vocab = Vocab(config.vocab)
    if config.is_encoder_decoder:
        return _pad([vocab.encode(s) + [EOS] for s in sources], PAD)
    seqs = [[BOS] + vocab.encode(s) + [SEP] for s in sources]
    if len({len(s) for s in seqs}) > 1:
        raise ValueError("decoder-only prompts in one batch must have equal length")
    return _pad(seqs, PAD)


@torch.no_grad()
def greedy_generate(model: Transformer, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the KV cache; returns new token ids (B, max_new_tokens).

    Rows keep decoding after their ``<eos>`` (``Vocab.decode`` stops there), so every row of
    the batch advances in lockstep — the same loop the ONNX runtime path runs.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if model.config.is_encoder_decoder:
        cross = model.cross_kv(model.encode(ids, mask))
        logits, past = model.decode(
            torch.full((ids.shape[0], 1), BOS, dtype=torch.long), cross=cross, encoder_attention_mask=mask
        )
    else:
        cross = None
        logits, past = model.decode(ids, attention_mask=mask)
    out = []
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        if step == max_new_tokens - 1:
            break
        if model.config.is_encoder_decoder:
            logits, past = model.decode(nxt, past=past, cross=cross, encoder_attention_mask=mask)
        else:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            logits, past = model.decode(nxt, past=past, attention_mask=mask)
    return torch.cat(out, dim=1)
