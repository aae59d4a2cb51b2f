"""The math of the LoRA paper's section 7 (Hu et al., 2021), in float64, for one module.

Conventions: ``W`` is the base weight as (out, in) — GPT-2's ``Conv1D`` weights, stored
(in, out), are transposed by the caller — ``A`` is (r, in), ``B`` is (out, r) and
``ΔW = s·B·A`` with ``s`` the module's scaling. ``U`` (out, k) and ``V`` (in, k) hold singular
vectors as columns, so the paper's ``‖Uᵀ W Vᵀ‖_F`` (its ``V`` has them as rows) is
``‖Uᵀ W V‖_F`` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64
ENERGY_THRESHOLD = 0.9  # rank_90: the fewest directions holding 90% of ‖ΔW‖_F²
RANDOM_DRAWS = 10  # random subspaces averaged for proj_random


@dataclass
class DeltaSVD:
    """The thin SVD of ``ΔW = s·B·A``: ``ΔW = u @ diag(s) @ v.T``."""

    u: torch.Tensor  # (out, k) left singular vectors, orthonormal columns
    s: torch.Tensor  # (k,) singular values, descending
    v: torch.Tensor  # (in, k) right singular vectors, orthonormal columns


def delta_svd(a: torch.Tensor, b: torch.Tensor, scaling: float) -> DeltaSVD:
    """SVD of ``s·B·A`` from the factors, without forming the (out × in) product.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QR), so ``s·B·A = Q_B (s·R_B R_Aᵀ) Q_Aᵀ``; the SVD
    of the small core ``C = s·R_B R_Aᵀ = U_C Σ V_Cᵀ`` gives ``U = Q_B U_C``, ``V = Q_A V_C``.
    Cost O((out + in)·r²) instead of O(out·in·r). k = min(r, out, in).
    """
    qb, rb = torch.linalg.qr(b.to(F64))  # (out, kb), (kb, r)
    qa, ra = torch.linalg.qr(a.to(F64).T)  # (in, ka), (ka, r)
    core = scaling * (rb @ ra.T)  # (kb, ka)
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)  # (kb, k), (k,), (k, ka)
    return DeltaSVD(qb @ uc, s, qa @ vch.T)


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli, 2007): ``exp(−Σ pᵢ log pᵢ)``, ``pᵢ = σᵢ / Σσ``.

    1 when one direction carries everything, k when all k singular values are equal; 0 for
    ΔW = 0. Continuous, so it separates "one strong direction plus noise" from "rank 1".
    """
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy(s: torch.Tensor) -> list[float]:
    """Cumulative energy ``Σ_{i≤k} σᵢ² / Σ σᵢ²`` for k = 1..len(s): the share of ‖ΔW‖_F² in the top k."""
    sq = s.to(F64) ** 2
    total = float(sq.sum())
    if total <= 0.0:
        return [0.0] * len(s)
    return [float(x) for x in torch.cumsum(sq, 0) / total]


def rank_at(cumulative: list[float], threshold: float = ENERGY_THRESHOLD) -> int:
    """Fewest directions whose energy reaches ``threshold`` (0 when there is no energy)."""
    for k, e in enumerate(cumulative, start=1):
        if e >= threshold - 1e-12:
            return k
    return 0


def projection_norm(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """``‖Uᵀ W V‖_F``: how much of W lies in the subspaces spanned by U's and V's columns."""
    return float(torch.linalg.matrix_norm(u.T @ (w @ v)))  # (k, out) @ (out, k)


def top_singular_values(w: torch.Tensor, k: int) -> torch.Tensor:
    """W's k largest singular values, from the eigenvalues of the smaller Gram matrix.

    ``σᵢ² = λᵢ(WᵀW)``; eigvalsh of the (min(out, in))² Gram matrix costs a fraction of an SVD
    (0.4 s against 1–2 s for GPT-2's 2304 × 768 ``c_attn`` on a shared 2-core CPU), and its error, about
    float64 round-off times ``σ₁²``, is negligible for the top directions used here.
    """
    w = w.to(F64)
    gram = w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T  # (min, min)
    lam = torch.linalg.eigvalsh(gram).flip(0)[:k]  # descending
    return lam.clamp_min(0).sqrt()


def top_projection_norm(w_singular_values: torch.Tensor, k: int) -> float:
    """``‖U_Wᵀ W V_W‖_F`` for W's own top-k singular vectors, which is ``sqrt(Σ_{i≤k} σᵢ(W)²)``."""
    return float(torch.linalg.vector_norm(w_singular_values[:k]))


def random_orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(n, k) with orthonormal columns, uniform (Haar) over k-dim subspaces of Rⁿ."""
    q, r = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=F64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)  # sign fix: Haar


def random_bases(
    out_features: int, in_features: int, k: int, draws: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``draws`` pairs (U (out, k), V (in, k)) of random orthonormal bases, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (random_orthonormal(out_features, k, g), random_orthonormal(in_features, k, g)) for _ in range(draws)
    ]


def rank_tolerance(sigma_1: float, out_features: int, in_features: int) -> float:
    """Singular values of ΔW at or below this are round-off: ``max(out, in)·eps·σ₁``.

    A direction ΔW lacks (B = 0 after initialisation, a rank-deficient B or A) comes out of
    ``delta_svd`` as a singular value of a few ulps of σ₁ times a dimension factor (the
    backward error of Householder QR and of the SVD), and its singular vectors are arbitrary.
    ``max(out, in)·eps·σ₁`` is the standard bound for that error (Golub & Van Loan; numpy's
    ``matrix_rank`` default). Over 7,000 random rank-deficient factor pairs (out, in up to 200,
    r up to 16, factors scaled by up to 10^±6 as a whole or per rank direction) the largest
    spurious σ was 0.11 of it. A real direction that small (σ < 1e-11·σ₁ up to 45,000
    features) is invisible in every figure anyway.
    """
    return max(out_features, in_features) * torch.finfo(F64).eps * sigma_1


def numerical_rank(s: torch.Tensor, out_features: int, in_features: int) -> int:
    """How many of ``s`` (descending) exceed ``rank_tolerance``: 0 for ΔW = 0."""
    if len(s) == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > rank_tolerance(float(s[0]), out_features, in_features)).sum())


@dataclass
class ModuleFigures:
    """Every figure of one module, as plain numbers (see ``module_figures``)."""

    rank: int
    rank_used: int  # numerical rank of ΔW: the k of proj_delta, proj_top and proj_random
    scaling: float
    delta_fro: float
    w_fro: float
    singular_values: list[float]
    effective_rank: float
    energy: list[float]
    rank_90: int
    proj_delta: float | None  # None when ΔW = 0 (rank_used = 0): no subspace to project on
    proj_top: float | None
    proj_random: float | None
    amplification: float | None  # None when ΔW = 0, or ΔW has no component along W (proj_delta = 0)


def module_figures(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    *,
    draws: int = RANDOM_DRAWS,
    seed: int = 0,
) -> ModuleFigures:
    """ΔW = s·B·A against W (out, in), in float64.

    ``singular_values`` are all k = min(r, out, in) singular values of ΔW. U, V are the
    singular vectors of the ``rank_used`` of them above ``rank_tolerance`` (ΔW's numerical
    rank; r for a trained adapter): the others span no part of ΔW, their vectors are arbitrary.
    ``proj_delta = ‖Uᵀ W V‖_F``; ``proj_top`` the same with W's own top-``rank_used`` singular
    vectors; ``proj_random`` the mean over ``draws`` random orthonormal U, V of that many
    columns, drawn from ``seed``; ``amplification = ‖ΔW‖_F / proj_delta`` (the paper's
    amplification factor). For ΔW = 0 the four are None.
    """
    w = w.to(F64).contiguous()  # a transposed (Conv1D) view makes every product below 5x slower
    svd = delta_svd(a, b, scaling)
    k = numerical_rank(svd.s, *w.shape)
    delta_fro = float(torch.linalg.vector_norm(svd.s))
    cumulative = energy(svd.s)
    proj_delta = proj_top = proj_random = amplification = None
    if k > 0:
        proj_delta = projection_norm(w, svd.u[:, :k], svd.v[:, :k])
        proj_top = top_projection_norm(top_singular_values(w, k), k)
        bases = random_bases(w.shape[0], w.shape[1], k, draws, seed)
        proj_random = sum(projection_norm(w, u, v) for u, v in bases) / draws
        amplification = delta_fro / proj_delta if proj_delta > 0 else None
    return ModuleFigures(
        rank=int(a.shape[0]),
        rank_used=k,
        scaling=float(scaling),
        delta_fro=delta_fro,
        w_fro=float(torch.linalg.matrix_norm(w)),
        singular_values=[float(x) for x in svd.s],
        effective_rank=effective_rank(svd.s),
        energy=cumulative,
        rank_90=rank_at(cumulative),
        proj_delta=proj_delta,
        proj_top=proj_top,
        proj_random=proj_random,
        amplification=amplification,
    )


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """(in, k) right singular vectors of A (r × in), columns ordered by A's singular values."""
    return torch.linalg.svd(a.to(F64), full_matrices=False).Vh.T


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """The grid ``φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F² / min(i, j)`` (paper, eq. 4).

    U₁, U₂ are the right singular vectors of A₁ (r₁ × in) and A₂ (r₂ × in); entry ``[i−1, j−1]``
    is φ for the top-i and top-j directions, in [0, 1]: 1 when one subspace contains the
    other, ``max(i, j)/in`` expected for independent random subspaces.
    """
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"lora_A shapes {tuple(a1.shape)} and {tuple(a2.shape)} differ in input features")
    g = (right_singular_vectors(a1).T @ right_singular_vectors(a2)) ** 2  # (k1, k2)
    cum = g.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F²
    i = torch.arange(1, cum.shape[0] + 1, dtype=F64).unsqueeze(1)
    j = torch.arange(1, cum.shape[1] + 1, dtype=F64).unsqueeze(0)
    return cum / torch.minimum(i, j)
