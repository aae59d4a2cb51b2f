"""Every figure of ``spectra`` against direct float64 computations on the formed ΔW (numpy SVD)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraexport.analyze.spectra import (
    delta_svd,
    effective_rank,
    energy,
    module_figures,
    numerical_rank,
    random_bases,
    rank_at,
    rank_tolerance,
    subspace_similarity,
    top_singular_values,
)

# Figures vs the direct computation: both float64, different algorithms (QR + small SVD vs a
# full SVD of ΔW); they agree to ~1e-13; 1e-6 relative is the contract.
RTOL = 1e-6
# Absolute floor, relative to the largest value compared: a singular value near zero has no
# meaningful relative error (round-off of the larger ones is ~1e-16·σ₁).
ATOL_REL = 1e-10
DRAWS = 4

dims = st.integers(1, 24)
ranks = st.integers(1, 12)


def _case(out_f: int, in_f: int, r: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f))
    a = rng.standard_normal((r, in_f))
    b = rng.standard_normal((out_f, r))
    scaling = float(rng.uniform(-4, 4)) or 1.0
    return w, a, b, scaling


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


def _close(actual, expected, scale: float | None = None) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL_REL * scale)


@settings(max_examples=60, deadline=None)
@given(dims, dims, ranks, st.integers(0, 2**32 - 1))
def test_every_figure_matches_the_formed_delta(out_f, in_f, r, seed):
    w, a, b, s = _case(out_f, in_f, r, seed)
    delta = s * b @ a  # (out, in), formed
    k = min(r, out_f, in_f)
    u_ref, sv_ref, vt_ref = np.linalg.svd(delta)
    sv_ref = sv_ref[:k]
    u_k, v_k = u_ref[:, :k], vt_ref[:k].T
    uw, w_sv, vwt = np.linalg.svd(w)

    f = module_figures(_t(w), _t(a), _t(b), s, draws=DRAWS, seed=seed % 1000)

    assert f.rank_used == k  # Gaussian factors: full rank
    _close(f.singular_values, sv_ref)
    _close(f.delta_fro, np.linalg.norm(delta))
    _close(f.w_fro, np.linalg.norm(w))
    proj_delta = np.linalg.norm(u_k.T @ w @ v_k)
    _close(f.proj_delta, proj_delta, scale=np.linalg.norm(w))
    _close(f.proj_top, np.linalg.norm(uw[:, :k].T @ w @ vwt[:k].T))
    _close(f.proj_top, math.sqrt(float(np.sum(w_sv[:k] ** 2))))
    bases = random_bases(out_f, in_f, k, DRAWS, seed % 1000)
    _close(f.proj_random, np.mean([np.linalg.norm(u.numpy().T @ w @ v.numpy()) for u, v in bases]))
    if proj_delta > 1e-8 * np.linalg.norm(w):  # otherwise ΔW ⟂ W in round-off: the ratio is noise
        _close(f.amplification, np.linalg.norm(delta) / proj_delta)
    p = sv_ref / sv_ref.sum()
    p = p[p > 0]
    _close(f.effective_rank, math.exp(-float(np.sum(p * np.log(p)))))
    _close(f.energy, np.cumsum(sv_ref**2) / np.sum(sv_ref**2), scale=1.0)
    assert f.rank == r and f.scaling == s


@settings(max_examples=40, deadline=None)
@given(dims, dims, ranks, st.integers(0, 2**32 - 1))
def test_delta_svd_reconstructs_delta_with_orthonormal_factors(out_f, in_f, r, seed):
    _, a, b, s = _case(out_f, in_f, r, seed)
    svd = delta_svd(_t(a), _t(b), s)
    k = min(r, out_f, in_f)
    assert svd.u.shape == (out_f, k) and svd.v.shape == (in_f, k) and svd.s.shape == (k,)
    delta = s * b @ a
    scale = np.linalg.norm(delta)
    np.testing.assert_allclose((svd.u * svd.s) @ svd.v.T, delta, atol=1e-12 * scale)
    np.testing.assert_allclose(svd.u.T @ svd.u, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(svd.v.T @ svd.v, np.eye(k), atol=1e-12)
    assert torch.all(svd.s[:-1] >= svd.s[1:])


def test_top_singular_values_match_svd_for_both_orientations():
    rng = np.random.default_rng(0)
    for shape in ((40, 12), (12, 40)):
        w = rng.standard_normal(shape)
        _close(top_singular_values(_t(w), 5), np.linalg.svd(w, compute_uv=False)[:5])


def test_effective_rank_and_energy_on_known_spectra():
    assert effective_rank(torch.tensor([3.0, 3.0, 3.0, 3.0], dtype=torch.float64)) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3, dtype=torch.float64)) == 0.0
    cumulative = energy(torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert cumulative == pytest.approx([0.9, 1.0])
    assert rank_at(cumulative) == 1 and rank_at([0.5, 0.89, 1.0]) == 3 and rank_at([0.0, 0.0]) == 0


@pytest.mark.parametrize("zero", ["B", "A", "scaling"])
def test_zero_delta_has_no_subspace_and_no_projection_figures(zero):
    """ΔW = 0 (B = 0 right after initialisation): its singular vectors are arbitrary QR
    directions, so no projection figure means anything; they are None, not numbers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64)
    a, b, s = (
        (a * 0 if zero == "A" else a),
        (b * 0 if zero == "B" else b),
        (0.0 if zero == "scaling" else 2.0),
    )
    f = module_figures(w, a, b, s)
    assert f.delta_fro == 0.0 and f.singular_values == [0.0, 0.0, 0.0] and f.rank == 3
    assert f.effective_rank == 0.0 and f.rank_90 == 0 and f.energy == [0.0, 0.0, 0.0]
    assert f.rank_used == 0
    assert f.proj_delta is None and f.proj_top is None and f.proj_random is None
    assert f.amplification is None
    assert f.w_fro == pytest.approx(float(torch.linalg.matrix_norm(w)))


def _rank_deficient_case(seed: int = 3) -> tuple[np.ndarray, ...]:
    """W (40, 24) and an r=4 adapter whose B (40, 4) has rank 2: ΔW = s·B·A has rank 2."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((40, 24))
    b2 = rng.standard_normal((40, 2))
    m = rng.standard_normal((2, 4))
    a = rng.standard_normal((4, 24))
    return w, a, b2 @ m, b2, m @ a


def test_rank_deficient_delta_projects_on_its_numerical_rank_only():
    w, a, b, b2, a2 = _rank_deficient_case()
    s = 1.5
    delta = s * b @ a  # formed, float64
    assert np.linalg.matrix_rank(delta) == 2  # the direct reference agrees ΔW has rank 2
    u, sv, vt = np.linalg.svd(delta)
    u2, v2 = u[:, :2], vt[:2].T
    w_sv = np.linalg.svd(w, compute_uv=False)

    f = module_figures(_t(w), _t(a), _t(b), s, draws=DRAWS, seed=7)

    assert f.rank == 4 and f.rank_used == 2
    _close(f.singular_values, sv[:4])  # all r reported; the last two are round-off
    assert max(f.singular_values[2:]) <= rank_tolerance(f.singular_values[0], 40, 24)
    proj_delta = np.linalg.norm(u2.T @ w @ v2)
    _close(f.proj_delta, proj_delta, scale=np.linalg.norm(w))
    _close(f.proj_top, np.sqrt(np.sum(w_sv[:2] ** 2)))  # W's top 2, not top 4
    bases = random_bases(40, 24, 2, DRAWS, 7)  # random subspaces of dimension 2, like ΔW's
    _close(f.proj_random, np.mean([np.linalg.norm(u.numpy().T @ w @ v.numpy()) for u, v in bases]))
    _close(f.amplification, np.linalg.norm(delta) / proj_delta)

    # The same ΔW from a genuine r=2 adapter: every figure but the rank is the same.
    g = module_figures(_t(w), _t(a2), _t(b2), s, draws=DRAWS, seed=7)
    assert g.rank == 2 and g.rank_used == 2
    for name in ("proj_delta", "proj_top", "proj_random", "amplification", "delta_fro", "effective_rank"):
        _close(getattr(f, name), getattr(g, name), scale=max(abs(getattr(g, name)), 1.0))


def test_numerical_rank_against_numpy_matrix_rank():
    rng = np.random.default_rng(0)
    for true_rank in (0, 1, 3, 5):
        delta = rng.standard_normal((30, true_rank)) @ rng.standard_normal((true_rank, 12))
        sv = torch.from_numpy(np.linalg.svd(delta, compute_uv=False))
        assert numerical_rank(sv, 30, 12) == np.linalg.matrix_rank(delta) == true_rank
    assert numerical_rank(torch.zeros(0, dtype=torch.float64), 3, 3) == 0
    assert rank_tolerance(2.0, 30, 12) == 30 * np.finfo(np.float64).eps * 2.0


def test_delta_orthogonal_to_w_has_no_amplification():
    w = torch.zeros(4, 4, dtype=torch.float64)
    w[0, 0] = 1.0
    a = torch.zeros(1, 4, dtype=torch.float64)
    b = torch.zeros(4, 1, dtype=torch.float64)
    a[0, 1], b[1, 0] = 1.0, 1.0  # ΔW = e₁e₁ᵀ, W = e₀e₀ᵀ: no overlap
    f = module_figures(w, a, b, 1.0)
    assert f.proj_delta == 0.0 and f.amplification is None


# ---- subspace similarity ---------------------------------------------------------------
def _phi_direct(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    u1 = np.linalg.svd(a1, full_matrices=False)[2].T  # right singular vectors (in, k1)
    u2 = np.linalg.svd(a2, full_matrices=False)[2].T
    grid = np.empty((u1.shape[1], u2.shape[1]))
    for i in range(1, u1.shape[1] + 1):
        for j in range(1, u2.shape[1] + 1):
            grid[i - 1, j - 1] = np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
    return grid


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24), ranks, ranks, st.integers(0, 2**32 - 1))
def test_phi_grid_matches_direct_computation(in_f, r1, r2, seed):
    rng = np.random.default_rng(seed)
    a1, a2 = rng.standard_normal((r1, in_f)), rng.standard_normal((r2, in_f))
    grid = subspace_similarity(_t(a1), _t(a2))
    _close(grid.numpy(), _phi_direct(a1, a2), scale=1.0)
    assert grid.min() >= -1e-12 and grid.max() <= 1 + 1e-12


def test_phi_of_identical_adapters_is_one_everywhere():
    a = torch.randn(8, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = subspace_similarity(a, a)
    torch.testing.assert_close(torch.diagonal(grid), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(grid, torch.ones(8, 8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_phi_of_same_row_space_reaches_one_at_full_rank():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 20, generator=g, dtype=torch.float64)
    mixed = torch.randn(4, 4, generator=g, dtype=torch.float64) @ a  # another basis of the same subspace
    assert float(subspace_similarity(a, mixed)[-1, -1]) == pytest.approx(1.0, abs=1e-12)


def test_phi_of_independent_random_subspaces_is_max_ij_over_d():
    d, r1, r2, trials = 128, 4, 8, 60
    g = torch.Generator().manual_seed(0)
    mean = (
        sum(
            subspace_similarity(
                torch.randn(r1, d, generator=g, dtype=torch.float64),
                torch.randn(r2, d, generator=g, dtype=torch.float64),
            )
            for _ in range(trials)
        )
        / trials
    )
    i = torch.arange(1, r1 + 1, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(1, r2 + 1, dtype=torch.float64).unsqueeze(0)
    expected = i * j / (d * torch.minimum(i, j))  # E‖U_iᵀU_j‖² = i·j/d for Haar subspaces
    ratio = mean / expected
    assert 0.5 < float(ratio.min()) and float(ratio.max()) < 1.5, ratio
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.1)


def test_phi_refuses_different_input_features():
    with pytest.raises(ValueError, match="input features"):
        subspace_similarity(torch.zeros(2, 5), torch.zeros(2, 6))
