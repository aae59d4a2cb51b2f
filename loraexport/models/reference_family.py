"""The reference Transformer as a ``ModelFamily``."""

from __future__ import annotations

import random

import torch

from loraexport.models import reference as ref
from loraexport.models.base import Inputs, ModelFamily, ParityCase
from loraexport.models.reference_onnx import graph_specs
from loraexport.models.transformer import Transformer

N_SPECIAL = len(ref.SPECIALS)
# Longest parity case: attention is O(T²), so a batch of 16 at max_len would take 16·H·max_len²
# float32 scores (268 MB per head at 2048 positions, 17 GB at 16384); at 512, 17 MB per head.
# Positions beyond it read the same sinusoid table, exported as it is.
MAX_CASE_LEN = 512


def _runtime_meta(model: Transformer) -> dict:
    c = model.config
    return {
        "kind": "seq2seq" if c.is_encoder_decoder else "causal",
        "special_tokens": {"pad": ref.PAD, "bos": ref.BOS, "eos": ref.EOS, "sep": ref.SEP},
        "vocab": c.vocab,
        "max_len": c.max_len,
        "n_layers": c.n_decoder_layers,
        "attention_heads": c.n_heads,
        "kv_heads": c.n_heads,  # no grouped-query attention: one key/value head per query head
        "head_dim": c.d_model // c.n_heads,
    }


def _random_ids(rng: torch.Generator, vocab: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(N_SPECIAL, vocab, shape, generator=rng)


def _batch(model: Transformer, batch: int, seq: int, rng: torch.Generator, ragged: bool) -> ParityCase:
    """Random tokens; ``ragged`` right-pads rows to random lengths (masks exercised)."""
    c = model.config
    ids = _random_ids(rng, c.vocab_size, (batch, seq))
    lengths = [seq] * batch
    if ragged and batch > 1:
        lengths = [seq] + torch.randint(2, seq + 1, (batch - 1,), generator=rng).tolist()
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, ref.PAD)
    name = f"b{batch}xs{seq}{'-padded' if ragged else ''}"
    if c.is_encoder_decoder:
        dec = torch.cat(
            [torch.full((batch, 1), ref.BOS), _random_ids(rng, c.vocab_size, (batch, seq - 1))], 1
        )
        return ParityCase(
            name,
            {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec},
            torch.ones(batch, seq, dtype=torch.bool),
        )
    return ParityCase(name, {"input_ids": ids, "attention_mask": mask}, mask.bool())


def _parity_cases(model: Transformer, n: int, seed: int) -> list[ParityCase]:
    """``n`` cases cycling through batch sizes 1, 4, 16 and lengths from short to ``max_len``
    (at most ``MAX_CASE_LEN``)."""
    rng = torch.Generator().manual_seed(seed)
    top = min(model.config.max_len, MAX_CASE_LEN)
    shapes = [(1, min(8, top)), (4, min(16, top)), (16, top), (4, top), (1, 2), (16, min(12, top))]
    return [_batch(model, *shapes[i % len(shapes)], rng, ragged=i % 2 == 1) for i in range(n)]


def _prompts(
    model: Transformer, tokenizer: None, sources: list[str] | None, n: int, seed: int
) -> list[tuple[Inputs, int]]:
    """Generation batches: held-out sources if given (else random digit strings), grouped by
    length. The reference model has no tokenizer: its config lists its characters (``ref.Vocab``)."""
    if sources is None:
        rng = random.Random(seed)
        alphabet = model.config.vocab[N_SPECIAL:]
        sources = ["".join(rng.choice(alphabet) for _ in range(rng.randint(4, 8))) for _ in range(n)]
    limit = model.config.max_len - 2
    groups: dict[int, list[str]] = {}
    for s in sources:
        groups.setdefault(len(s), []).append(s[:limit])
    out = []
    for length, group in sorted(groups.items()):
        max_new = min(
            length + 1, model.config.max_len - (0 if model.config.is_encoder_decoder else length + 2)
        )
        out.append((ref.prompt_ids(model.config, group), max(1, max_new)))
    return out


def _latency_inputs(model: Transformer, batch: int, seq: int) -> Inputs:
    return _batch(
        model, batch, min(seq, model.config.max_len), torch.Generator().manual_seed(0), False
    ).inputs


REFERENCE = ModelFamily(
    name="reference-transformer",
    detect=lambda cfg: cfg.get("model_type") == ref.MODEL_TYPE,
    load=lambda directory, supplied=(): ref.load_model(directory),  # no heads to supply: all stored
    tokenizer=lambda directory: None,
    save=ref.save_model,
    graph_specs=graph_specs,
    runtime_meta=_runtime_meta,
    parity_cases=_parity_cases,
    prompts=_prompts,
    generate=ref.greedy_generate,
    latency_inputs=_latency_inputs,
    latency_points=((1, 8), (1, 32), (16, 32)),
    extra_files=("config.json",),
)
