"""Properties of the merge across dtypes, and of the adapter format (hypothesis).

Complements test_layer.py (forward vs the float64 formula; merge then unmerge returns W0 within
float32 rounding) and test_merge.py (merged weights vs a float64 reference): here the merged
*plain* layer's forward is compared with the unmerged LoRA layer's in float32, float16 and
bfloat16, and an adapter of random shapes, ranks, dtypes and config survives save/load bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from artifacts import random_lora_linear
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loraexport.lora.adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.layer import LoRALinear
from loraexport.lora.merge import merge_state_dict

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps


def merged_vs_unmerged_tolerance(dtype: torch.dtype, terms: int) -> float:
    """Bound on |merged − unmerged| relative to the summand scale ``size`` (see the test).

    Each rounding to ``dtype`` costs at most eps/2 of a value no larger than ``size``: the
    unmerged layer rounds x·Aᵀ, (x·Aᵀ)·Bᵀ, the product by s, the base output and the sum (5);
    the merged one rounds W0 + s·B·A once (computed in float64) and its output (2). Seven
    half-eps roundings give 3.5 eps. The dot products themselves accumulate ``terms`` (in + r)
    products: in float32 that is up to terms/2 more eps32 (the worst case, not the typical
    sqrt); CPU matmuls of float16/bfloat16 accumulate in float32, so the same term in eps32.
    (Observed over 400 random cases: at most 1.9 eps for float32, 1.2 for float16, 1.0 for bfloat16.)
    """
    return 3.5 * torch.finfo(dtype).eps + terms / 2 * EPS32


def _layers(in_f: int, out_f: int, r: int, s: float, dtype: torch.dtype, seed: int):
    """An unmerged LoRALinear in ``dtype`` and the plain nn.Linear holding its merged weights."""
    unmerged = random_lora_linear(in_f, out_f, r, s, seed, dtype)
    base = unmerged.base_layer
    a, b = unmerged.lora_A.detach(), unmerged.lora_B.detach()
    adapter = Adapter(LoraConfig(r=r, lora_alpha=s * r, target_modules=["lin"]), {"lin": (a, b)})
    state = {"lin.weight": base.weight.detach(), "lin.bias": base.bias.detach()}
    merged, _ = merge_state_dict(state, [adapter])
    plain = nn.Linear(in_f, out_f, dtype=dtype)
    plain.load_state_dict({k.removeprefix("lin."): v for k, v in merged.items()}, strict=True)
    return unmerged, plain


def _size(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """|x|·|W0|ᵀ + |b| + s·(|x|·|A|ᵀ)·|B|ᵀ in float64: the scale of every rounding error above."""
    x, w0 = x.double().abs(), layer.base_layer.weight.double().abs()
    a, b = layer.lora_A.double().abs(), layer.lora_B.double().abs()
    return x @ w0.T + layer.base_layer.bias.double().abs() + layer.scaling * (x @ a.T) @ b.T


@settings(deadline=None, max_examples=60)
@given(
    in_f=st.integers(1, 48),
    out_f=st.integers(1, 48),
    r=st.integers(1, 8),
    scaling=st.floats(0.01, 16.0),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_merged_forward_equals_unmerged_forward(in_f, out_f, r, scaling, batch, dtype, seed):
    unmerged, plain = _layers(in_f, out_f, r, scaling, dtype, seed)
    x = torch.randn(*batch, in_f, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        want, got = unmerged(x), plain(x)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == (*batch, out_f)
    err = (got.double() - want.double()).abs()
    bound = merged_vs_unmerged_tolerance(dtype, in_f + r) * _size(unmerged, x)
    assert (err <= bound).all(), ((err / _size(unmerged, x)).max().item(), torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerance_catches_a_wrong_scaling(dtype):
    """The bound is tight enough to matter: the same weights merged with s doubled break it."""
    unmerged, _ = _layers(16, 8, 4, 2.0, dtype, seed=5)
    _, wrong = _layers(16, 8, 4, 4.0, dtype, seed=5)  # same W0, A and B (same seed)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(6)).to(dtype)
    with torch.no_grad():
        err = (wrong(x).double() - unmerged(x).double()).abs()
    bound = merged_vs_unmerged_tolerance(dtype, 16 + 4) * _size(unmerged, x)
    assert (err > bound).any()


# ---- adapter save/load round trip -------------------------------------------------------------
NAMES = {"q": (12, 12), "k": (12, 6), "v": (12, 6), "o": (6, 12)}  # module -> (in, out) features


def _bits(t: torch.Tensor) -> bytes:
    """The tensor's exact bytes (-0.0 differs from 0.0; torch.equal would not tell)."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


@st.composite
def adapters(draw) -> Adapter:
    names = draw(st.lists(st.sampled_from(sorted(NAMES)), min_size=1, max_size=4, unique=True))
    layers = draw(st.integers(1, 3))
    r = draw(st.integers(1, 6))
    rank_pattern = draw(st.dictionaries(st.sampled_from(names), st.integers(1, 6), max_size=1))
    bias = draw(st.sampled_from(["none", "all"]))
    config = LoraConfig(
        r=r,
        lora_alpha=draw(st.one_of(st.integers(1, 64), st.floats(0.125, 64, allow_nan=False))),
        target_modules=names,
        use_rslora=draw(st.booleans()),
        rank_pattern=rank_pattern,
        alpha_pattern=draw(st.dictionaries(st.sampled_from(names), st.floats(0.5, 32), max_size=1)),
        bias=bias,
        modules_to_save=draw(st.sampled_from([None, ["head"]])),
        lora_dropout=draw(st.sampled_from([0.0, 0.05, 0.1])),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny / 2, info.max, -info.max], dtype=torch.float64)

    def tensor(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * 2.0 ** draw(st.integers(-10, 10))
        t = t.to(dtype)
        if t.numel() and draw(st.booleans()):  # extreme but finite values: signed zero, subnormal, max
            t.view(-1)[: len(special)] = special[: t.numel()].to(dtype)
        return t

    weights, replacements = {}, {}
    for i in range(layers):
        for name in names:
            path = f"layers.{i}.{name}"
            in_f, out_f = NAMES[name]
            rank = config.rank(path)
            weights[path] = (tensor(rank, in_f), tensor(out_f, rank))
            if bias != "none":
                replacements[f"{path}.bias"] = tensor(out_f)
    if config.modules_to_save:
        replacements["head.weight"] = tensor(14, 12)
    return Adapter(config, weights, None, replacements)


@settings(deadline=None, max_examples=40)
@given(adapter=adapters())
def test_adapter_save_load_round_trip_is_bit_identical(adapter):
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp, "first"), Path(tmp, "second")
        first.mkdir()
        second.mkdir()
        adapter.save(first)
        loaded = Adapter.load(first)
        assert loaded.config.to_dict() == adapter.config.to_dict()
        assert loaded.weights.keys() == adapter.weights.keys()
        for path, (a, b) in adapter.weights.items():
            la, lb = loaded.weights[path]
            assert (la.dtype, lb.dtype) == (a.dtype, b.dtype), path
            assert (_bits(la), _bits(lb)) == (_bits(a), _bits(b)), path
        assert loaded.replacements.keys() == adapter.replacements.keys()
        for name, t in adapter.replacements.items():
            assert loaded.replacements[name].dtype == t.dtype and _bits(loaded.replacements[name]) == _bits(t)
        for path in adapter.weights:
            assert loaded.config.scaling(path) == adapter.config.scaling(path)
        loaded.save(second)  # and saving what was loaded writes the same bytes
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            assert (first / f).read_bytes() == (second / f).read_bytes(), f
