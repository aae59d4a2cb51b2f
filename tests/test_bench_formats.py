"""The two scripts that choose (or refuse) a quantized format: ``benchmarks/bench_kernels.py`` times
each kernel's graph, so each graph must compute the product it stands for; ``benchmarks/sim_formats.py``
rounds weights and inputs as a format would, so its rounding must be the format's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from loraexport.export.qformat import NBits, nbits_dequantize

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


kernels = _module("bench_kernels")
sim = _module("sim_formats")


# ---- bench_kernels: every variant runs, and the two composite graphs compute x·W ---------------------
def test_every_kernel_variant_runs_and_float32_is_the_unit():
    rows = kernels.measure(threads=1, runs=1, shapes=(("tiny", 64, 32),), rows=(1, 3))
    assert {r["variant"] for r in rows} == {name for name, _ in kernels.variants()}
    assert len(rows) == 2 * len(kernels.variants())
    for r in rows:
        assert r["us"] > 0
        if r["variant"] == "MatMul float32":
            assert r["x_float32"] == 1.0
    table = kernels.markdown(rows, "a host", 1)
    assert "| MatMul float32 | " in table and "tiny, M=3" in table


def _run(nodes, k: int, n: int, x: np.ndarray) -> tuple[np.ndarray, dict]:
    sess = kernels._session(nodes, k, n, threads=1)
    weights = {t.name: numpy_helper.to_array(t) for t in nodes[1]}
    return sess.run(None, {"x": x})[0], weights


def test_the_offset_variant_is_the_codes_product_plus_the_block_sums_times_the_offsets():
    k, n, block = 64, 8, 32
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, k), dtype=np.float32)
    y, w = _run(kernels._offset(k, n, block, rng), k, n, x)
    codes = nbits_dequantize(w["b"], w["s"], NBits(k, n, 4, block)).astype(np.float64)  # (K, N)
    full = codes + np.repeat(w["offsets"].astype(np.float64), block, axis=0)  # w = s·(q − 8) + offset
    # float64 reference; the kernel rounds x to int8 per block (accuracy level 4): relative error
    # of x up to 1/254 per block, so the product within 1% of the terms' magnitude
    ref = x.astype(np.float64) @ full
    bound = 0.01 * (np.abs(x).astype(np.float64) @ np.abs(full)) + 1e-6
    assert np.all(np.abs(y - ref) <= bound)
    # the offsets matter: without them the product is out of that bound
    assert np.any(np.abs(y - x.astype(np.float64) @ codes) > bound)


def test_the_per_token_w8a8_variant_scales_each_row_alone():
    k, n = 64, 8
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, k), dtype=np.float32)
    x[1] *= 1000.0  # a row 1000× larger must not coarsen the others' rounding (per tensor would)
    y, w = _run(kernels._w8a8(k, n, True, rng), k, n, x)
    weight = w["w"].astype(np.float64) * w["w_scale"].astype(np.float64)  # (K, N)
    ref = x.astype(np.float64) @ weight
    for row in range(3):  # half a step of x's row (amax / 127 / 2) per term, at most
        step = np.abs(x[row]).max() / 127
        bound = 0.5 * step * np.abs(weight).sum(0) * 1.001 + 1e-6
        assert np.all(np.abs(y[row] - ref[row]) <= bound)


# ---- sim_formats: the rounding is the format's ------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_sym_is_what_matmulnbits_computes_with(bits):
    """The symmetric rows' weights, against the kernel itself: MatMulNBits at accuracy level 1
    (float32 arithmetic) of the exports' packed codes equals x·sim.sym(w)ᵀ to float32 rounding."""
    from onnx import helper

    from loraexport.export.qformat import nbits_quantize

    n, k, block = 8, 64, 16
    w = torch.randn(n, k)
    packed, scales = nbits_quantize(w.T.contiguous().numpy(), bits, block)
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=block, accuracy_level=1,
    )  # fmt: skip
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.reshape(-1), "s")]
    x = np.random.default_rng(3).standard_normal((2, k), dtype=np.float32)
    y, _ = _run(([node], inits), k, n, x)
    want = x.astype(np.float64) @ sim.sym(w, bits, block).double().numpy().T
    assert np.abs(y - want).max() <= 1e-5 * np.abs(x).sum(1).max() * float(w.abs().max())
    assert np.abs(y - x.astype(np.float64) @ w.double().numpy().T).max() > 1e-4  # it did round


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_float_offsets_hold_a_q4_1_grid_exactly(seed):
    """Weights already on a 4-bit grid with a float minimum per block (GGUF's Q4_1), codes 0 and 15
    used in each block: the min-max asymmetric format finds the same grid (float32 rounding only)."""
    g = torch.Generator().manual_seed(seed)
    n, blocks, block = 4, 2, 32
    q = torch.randint(0, 16, (n, blocks, block), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(n, blocks, 1, generator=g) * 0.1 + 1e-3
    m = torch.randn(n, blocks, 1, generator=g)
    w = (d * q + m).reshape(n, blocks * block)
    assert torch.allclose(sim.asym(w, block, True), w, atol=1e-5 * float(w.abs().max()), rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_asym_error_is_at_most_half_a_step(seed, float_offset):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 64, generator=g) * torch.rand(1, generator=g)
    got = sim.asym(w, 32, float_offset)
    wb = w.reshape(4, 2, 32)
    lo, hi = wb.amin(-1, keepdim=True), wb.amax(-1, keepdim=True)
    if not float_offset:  # an integer zero point: the range widened to hold zero
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    step = (hi - lo) / 15
    # half a step from rounding the code; an integer zero point moves the grid by up to half a step
    # more, the codes then clamped at an end: one step in all (plus float32 rounding)
    allowed = (0.5 if float_offset else 1.0) * step * (1 + 1e-5) + 1e-7
    assert torch.all((got - w).reshape(4, 2, 32).abs() <= allowed)


@pytest.mark.parametrize("round_input", ["act_token", "act_blocks"])
def test_activation_rounding_is_int8_of_its_own_scale(round_input):
    x = torch.randn(3, 64)
    x[0, :32] *= 100  # an outlier block in one row
    got = sim.act_token(x) if round_input == "act_token" else sim.act_blocks(x, 32)
    groups = x.reshape(3, 1, 64) if round_input == "act_token" else x.reshape(3, 2, 32)
    step = groups.abs().amax(-1, keepdim=True) / 127
    assert torch.all((got - x).reshape(groups.shape).abs() <= step / 2 * (1 + 1e-5))
    if round_input == "act_blocks":  # the outlier block does not coarsen its row's other block
        assert (got - x)[0, 32:].abs().max() <= x[0, 32:].abs().max() / 254 * (1 + 1e-5)


def test_wide_is_what_our_int4_keeps_in_8_bits():
    sim.HIDDEN[0] = 576
    assert sim.wide("lm_head", 576)
    assert sim.wide("model.layers.0.mlp.down_proj", 1536)
    assert not sim.wide("model.layers.0.mlp.up_proj", 576)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([4, 8]))
def test_searched_scales_never_round_worse_than_absmax(seed, bits):
    """Per block, the searched scale's squared error is at most the absmax scale's (ratio 1.0 is
    among those tried), and every weight sits on its block's grid: codes −2^(bits−1)…2^(bits−1)−1
    times one scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 64, generator=g) * torch.rand(3, 64, generator=g) ** 3  # heavy-tailed
    got, plain = sim.searched(w, bits, 16), sim.sym(w, bits, 16)
    err = lambda q: ((q - w) ** 2).reshape(3, 4, 16).sum(-1)  # noqa: E731
    assert torch.all(err(got) <= err(plain) * (1 + 1e-5) + 1e-12)
    blocks = got.reshape(3, 4, 16).double()
    # the block's peak lands on code −2^(bits−1) (the searched scale clips it there or is absmax's),
    # so its largest magnitude is 2^(bits−1) steps: every value is a whole number of steps
    step = blocks.abs().amax(-1, keepdim=True) / 2 ** (bits - 1)
    codes = blocks / torch.where(step == 0, torch.ones_like(step), step)
    assert torch.all((codes - codes.round()).abs() < 1e-4) and torch.all(codes.abs() <= 2 ** (bits - 1))
    peaks = w.abs().reshape(3, 4, 16).amax(-1, keepdim=True)
    assert torch.all((got - w).abs().reshape(3, 4, 16) <= peaks + 1e-6)  # no weight moves past its peak
