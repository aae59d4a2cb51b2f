"""A planted case: W with a known SVD, ΔW built to amplify directions W itself weights weakly.

W = Σ σᵢ uᵢ vᵢᵀ with σᵢ = 10·0.8ⁱ. ΔW = s·Σ cₖ u_jₖ v_jₖᵀ for weak directions jₖ, split into
factors B, A that are *not* orthogonal (mixed by a random invertible matrix), so the
factor-based SVD has to find the directions. Then, exactly:

- singular values of ΔW = s·cₖ (descending), ‖ΔW‖_F = s·‖c‖;
- U, V = the planted u_j, v_j, so Uᵀ W V = diag(σ_j) and proj_delta = ‖σ_j‖;
- proj_top = ‖(σ₀, …, σ_{r−1})‖ (W's own top-r directions);
- amplification = s·‖c‖ / ‖σ_j‖;
- proj_random ≈ r·‖W‖_F / √(out·in) (E‖UᵀWV‖_F² = r²‖W‖_F²/(out·in) for Haar U, V).
"""

from __future__ import annotations

import math

import pytest
import torch

from loraexport.analyze.spectra import module_figures

OUT, IN = 64, 48
SIGMA = [10 * 0.8**i for i in range(IN)]
SCALING = 2.0
RTOL = 1e-9  # exact constructions: only float64 round-off separates result and expectation
RANDOM_DRAWS = 200


def _planted_w(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(OUT, IN, generator=g, dtype=torch.float64))  # (OUT, IN)
    v, _ = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))  # (IN, IN)
    w = u @ torch.diag(torch.tensor(SIGMA, dtype=torch.float64)) @ v.T  # (OUT, IN)
    return w, u, v


def _planted_factors(
    u: torch.Tensor, v: torch.Tensor, directions: list[int], strengths: list[float], seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) with s·B·A = s·Σ cₖ u_jₖ v_jₖᵀ, mixed by a random invertible M."""
    r = len(directions)
    b = u[:, directions] * torch.tensor(strengths, dtype=torch.float64)  # (OUT, r)
    a = v[:, directions].T  # (r, IN)
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    return m @ a, b @ torch.linalg.inv(m)  # B·A unchanged


@pytest.mark.parametrize(
    "directions,strengths",
    [([8], [10.0]), ([8, 12], [10.0, 4.0]), ([20, 9, 14], [1.0, 6.0, 3.0])],
    ids=["rank1", "rank2", "rank3"],
)
def test_planted_weak_directions_come_out_as_constructed(directions, strengths):
    w, u, v = _planted_w()
    a, b = _planted_factors(u, v, directions, strengths)
    r = len(directions)
    f = module_figures(w, a, b, SCALING, draws=RANDOM_DRAWS, seed=0)

    c = torch.tensor(strengths, dtype=torch.float64)
    sigma_j = torch.tensor([SIGMA[j] for j in directions], dtype=torch.float64)
    expected_delta_fro = SCALING * float(c.norm())
    expected_proj_delta = float(sigma_j.norm())
    assert f.singular_values == pytest.approx(sorted((SCALING * c).tolist(), reverse=True), rel=RTOL)
    assert f.delta_fro == pytest.approx(expected_delta_fro, rel=RTOL)
    assert f.proj_delta == pytest.approx(expected_proj_delta, rel=RTOL)
    assert f.proj_top == pytest.approx(math.sqrt(sum(s**2 for s in SIGMA[:r])), rel=RTOL)
    assert f.amplification == pytest.approx(expected_delta_fro / expected_proj_delta, rel=RTOL)
    assert f.w_fro == pytest.approx(math.sqrt(sum(s**2 for s in SIGMA)), rel=RTOL)
    p = c / c.sum()
    assert f.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=RTOL)

    # The random baseline: mean of ‖UᵀWV‖_F lies below its root mean square (Jensen), and
    # not far below it (the norm of a sum of many small terms concentrates).
    rms = r * f.w_fro / math.sqrt(OUT * IN)
    assert 0.6 * rms < f.proj_random < 1.05 * rms
    # The paper's pattern, as planted: ΔW's subspace holds more of W than a random one,
    # far less than W's top directions, and ΔW is many times larger than that share.
    assert f.proj_random < f.proj_delta < f.proj_top
    assert f.amplification > 5


def test_planting_a_top_direction_gives_amplification_over_sigma1():
    """The opposite case: ΔW along W's strongest direction; proj_delta = proj_top = σ₀."""
    w, u, v = _planted_w()
    a, b = _planted_factors(u, v, [0], [5.0])
    f = module_figures(w, a, b, SCALING)
    assert f.proj_delta == pytest.approx(SIGMA[0], rel=RTOL)
    assert f.proj_top == pytest.approx(SIGMA[0], rel=RTOL)
    assert f.amplification == pytest.approx(SCALING * 5.0 / SIGMA[0], rel=RTOL)
