"""What quantizing an export costs, against the unmerged float32 model, and how much of the
adapter survives it: the *quality* of a quantized export, reported beside its proof.

Whether the file is right is proven elsewhere (``verify.proof``: the reference's quantization,
tensor by tensor; then parity against the dequantized reference). What it costs is measured here,
with onnxruntime running the quantized export as written (Q) and PyTorch the unmerged
float32 model (U), on text (``--eval-data``, else ``REFERENCE_TEXTS``) when the model has a
tokenizer, else on the parity cases' random token ids:
  * max abs logit error and top-1 agreement of Q against U (unmasked positions; a graph
    computing the last position only is run as prompt passes ending at each position, see
    ``prompt_logits``), and the
    share of generation prompts whose greedy tokens are identical;
  * ``adapter_retained`` = ⟨Q − Q₀, U − B⟩ / ⟨U − B, U − B⟩, where B is the float32 base
    without the adapter and Q₀ the base exported and quantized the same way: Q − Q₀ is the
    adapter's effect as the quantized model shows it, U − B its true effect, and the ratio is
    the share of the true effect found in it (the regression of one on the other). A merge
    whose small ΔW the quantization grid swallowed shows ~0; an adapter kept exactly shows ~1
    however coarse the base. Quantization error that does not follow the adapter adds to
    neither side of the inner product, so it cancels even where it is large;
  * ``adapter_effect_error`` = rms((Q − Q₀) − (U − B)) / rms(U − B): how far the effect as the
    quantized model shows it is from the true one, that error included. (Until 2026-11-30 the
    gate was 1 − this; on SmolLM2-135M with int4 it went below 0 for an adapter kept exactly
    in float32: Q's and Q₀'s quantization errors differ, because the adapter moves the
    activations the quantized weights see, and that difference was counted as adapter lost.)
These figures gate only under a budget the user sets (``verify.gates.Budget``: ``--min-top1``,
``--min-adapter-retained``, the latter bounded on both sides). Until 2026-12-06 ``adapter_retained``
≥ 50% was the only gate on a quantized export: a projection onto the adapter's effect, with no
upper bound and blind to an error at right angles to the adapter, it passed wrong files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from loraexport.models.base import ModelFamily, ParityCase
from loraexport.runtime.model import OnnxModel, chain_forward
from loraexport.verify.parity import torch_runner

# Text for the logit figures of a model with a tokenizer and no --eval-data: prose, code and a
# list, some hundred positions. Random token ids are no text: a real model's predictions on
# them are nearly flat, and top-1 agreement there measures ties, not what quantizing costs.
REFERENCE_TEXTS = (
    "The capital of France is Paris. It is known for the Eiffel Tower, for museums such as the "
    "Louvre, and for its cafes; many tourists visit every year to see them.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose and oxygen. The light reactions take place in the thylakoid membranes.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who went out "
    "in his boat every morning. One day he caught a fish that could speak.",
    "To make a cup of tea: boil water, warm the pot, add one spoon of tea per person, pour the "
    "water, wait four minutes, then pour the tea through a strainer.",
    "The three primary colours of light are red, green and blue; mixed in equal parts they give white.",
)
RETAINED_HOW = (
    "adapter_retained = <Q - Q0, U - B> / <U - B, U - B> over the logits (effect error: "
    "rms((Q - Q0) - (U - B)) / rms(U - B)): "
    "Q the quantized export, Q0 the base quantized the same way, U the unmerged float32 model, "
    "B the float32 base; the base's own quantization error cancels"
)


@dataclass
class QuantCost:
    dtype: str  # int8 | int4
    adapter: str  # "merged" (quantized with the base) | "kept in float32"
    max_abs_err: float  # logits (or first output) of Q against U, unmasked positions
    rms_err: float
    top1_agreement: float | None
    generation_agreement: float | None
    adapter_effect_rms: float  # rms(U - B): how far the adapter moves the outputs
    adapter_retained: float | None
    adapter_effect_error: float | None = None
    how: str = RETAINED_HOW
    inputs: str = "random token ids"  # what the logit figures were computed on
    positions: int = 0


def _main(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The logits (``model.logits``/``decoder.logits``), else an encoder's first output."""
    for name in ("decoder.logits", "model.logits"):
        if name in outputs:
            return outputs[name].astype(np.float64)
    return next(iter(outputs.values())).astype(np.float64)


@torch.no_grad()
def quantization_cost(
    family: ModelFamily,
    base: nn.Module,
    unmerged: nn.Module,
    quantized: OnnxModel,
    quantized_base: OnnxModel,
    dtype: str,
    adapter: str,
    *,
    seed: int = 0,
    samples: int = 6,
    sources: list[str] | None = None,
    tokenizer: Any | None = None,
) -> QuantCost:
    """The figures of the module docstring for one quantized export. Both sides run the
    exported graphs' chain (``runtime.chain_forward``): torch the modules that were exported,
    onnxruntime the files, so positions and masks are fed alike."""
    kind, shape = quantized.kind, quantized.cache_shape
    run_u, run_b = torch_runner(family, unmerged), torch_runner(family, base)
    err, sq, n, agree, total = 0.0, 0.0, 0, 0, 0
    effect_stats = np.zeros(3)
    cases, inputs_used = _cases(family, unmerged, tokenizer, sources, samples, seed)
    for case in cases:
        args = (
            case.inputs["input_ids"].numpy(),
            case.inputs["attention_mask"].numpy(),
            case.inputs["decoder_input_ids"].numpy() if "decoder_input_ids" in case.inputs else None,
        )
        u = _main(chain_forward(run_u, kind, shape, *args))
        b = _main(chain_forward(run_b, kind, shape, *args))
        q, q0 = prompt_logits(quantized, args), prompt_logits(quantized_base, args)
        valid = case.valid.numpy() if u.shape[:2] == tuple(case.valid.shape) else np.ones(u.shape[:2], bool)
        valid = valid & _checked(quantized, valid.shape)
        diff = (q - u)[valid]
        err = max(err, float(np.abs(diff).max(initial=0.0)))
        sq, n = sq + float((diff**2).sum()), n + diff.size
        effect_stats += effect_sums((q - q0)[valid], (u - b)[valid])
        agree += int((q.argmax(-1) == u.argmax(-1))[valid].sum())
        total += int(valid.sum())
    gen_rows = gen_same = 0
    for inputs, max_new in family.prompts(unmerged, tokenizer, sources, 16, seed):
        want = family.generate(unmerged, inputs, max_new).numpy()
        got = quantized.generate(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), max_new)
        gen_rows += want.shape[0]
        gen_same += int((got == want).all(axis=1).sum())
    effect = (effect_stats[1] / n) ** 0.5 if n else 0.0
    retained, effect_error = adapter_figures(effect_stats)
    return QuantCost(
        dtype,
        adapter,
        err,
        (sq / n) ** 0.5 if n else 0.0,
        agree / total if total else None,
        gen_same / gen_rows if gen_rows else None,
        effect,
        retained,
        effect_error,
        inputs=inputs_used,
        positions=total,
    )


# A graph computing the last position's logits only is checked at this many positions per row
# at most (each one prompt pass), evenly spaced: the cost grows with the square of the length.
MAX_PREFIX_PASSES = 96


def _prefix_positions(length: int) -> np.ndarray:
    if length <= MAX_PREFIX_PASSES:
        return np.arange(length)
    return np.unique(np.linspace(0, length - 1, MAX_PREFIX_PASSES).round().astype(int))


def _checked(model: OnnxModel, shape: tuple[int, ...]) -> np.ndarray:
    """The (batch, position) mask of positions ``prompt_logits`` computes."""
    mask = np.zeros(shape, bool)
    if model.kind == "causal" and model.logits == "last":
        mask[:, _prefix_positions(shape[1])] = True
    else:
        mask[:] = True
    return mask


def prompt_logits(model: OnnxModel, args: tuple) -> np.ndarray:
    """The quantized graph's logits at every position, as a prompt pass computes them.

    A graph computing the last position only gives each checked position's logits from a
    prompt pass that ends there (positions not checked are zeros, and ``_checked`` leaves them
    out). Stepping one token at a time through the cache (``forward_all``) would be faster, but
    it quantizes each row's activations alone: while int8-dynamic scaled activations per tensor,
    a prompt's rows shared one scale, and one row at a time flattered it (real SmolLM2-135M: 92.8%
    top-1 stepped, 66% in prompt passes). Per token (since 2026-12-07) the two agree; prompt
    passes stay, as a user's prompt is computed."""
    if model.kind != "causal" or model.logits != "last":
        return _main(model.forward_all(*args))
    ids, mask = args[0], args[1]
    out = None
    for p in _prefix_positions(ids.shape[1]):
        last = model.forward(ids[:, : p + 1], mask[:, : p + 1])[:, -1].astype(np.float64)
        if out is None:
            out = np.zeros((ids.shape[0], ids.shape[1], last.shape[-1]))
        out[:, p] = last
    return out


def effect_sums(shown: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(⟨shown, true⟩, ⟨true, true⟩, ‖shown − true‖²): what ``adapter_figures`` needs, summed
    over cases."""
    shown, true = shown.astype(np.float64), true.astype(np.float64)
    return np.array([(shown * true).sum(), (true * true).sum(), ((shown - true) ** 2).sum()])


def adapter_figures(sums: np.ndarray) -> tuple[float | None, float | None]:
    """(adapter_retained, adapter_effect_error) from ``effect_sums``; None without an effect."""
    dot, true_sq, miss_sq = (float(x) for x in sums)
    if true_sq <= 0:
        return None, None
    return dot / true_sq, (miss_sq / true_sq) ** 0.5


def _cases(family, unmerged, tokenizer, sources, samples, seed) -> tuple[list[ParityCase], str]:
    """Text (the given sources, else ``REFERENCE_TEXTS``) when the base has a tokenizer: a
    decoder's as unpadded batches, an encoder's as its family's ``text_cases``; else the parity
    cases (random token ids)."""
    causal = quantized_kind(unmerged, family) == "causal"
    if tokenizer is None or not (causal or family.text_cases is not None):
        return family.parity_cases(unmerged, samples, seed), "random token ids"
    texts = list(sources or REFERENCE_TEXTS)
    if causal:
        cases = [
            ParityCase(f"text-{i}", inputs, inputs["attention_mask"].bool())
            for i, (inputs, _) in enumerate(family.prompts(unmerged, tokenizer, texts, len(texts), seed))
        ]
    else:
        cases = family.text_cases(unmerged, tokenizer, texts)
    return cases, ("--eval-data text" if sources else "reference texts")


def quantized_kind(model: nn.Module, family: ModelFamily) -> str:
    return family.runtime_meta(model)["kind"]
