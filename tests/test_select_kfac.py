"""K-FAC memory builders against a Cholesky-whitened reference and the K-FAC loss itself."""

from __future__ import annotations

import pytest
import torch

from libortho.curvature.kfac import KFACFactors
from libortho.select.kfac import KFAC_MEMORY, kfac_loss, kfac_memory, rank_for_bits


def spd(d: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.logspace(-spread, 0, d, dtype=torch.float64)
    return Q @ torch.diag(lam) @ Q.T


def factors(d_out: int = 9, d_in: int = 7) -> KFACFactors:
    return KFACFactors(A=spd(d_in, 1), G=spd(d_out, 2), n_tokens=10, n_examples=2)


def reference_best_rank(R: torch.Tensor, G: torch.Tensor, A: torch.Tensor, rank: int, damp: float) -> torch.Tensor:
    """Whiten with Cholesky factors (not eigen square roots), truncate the SVD, un-whiten."""
    Gd = G + damp * torch.trace(G) / G.shape[0] * torch.eye(G.shape[0], dtype=G.dtype)
    Ad = A + damp * torch.trace(A) / A.shape[0] * torch.eye(A.shape[0], dtype=A.dtype)
    LG, LA = torch.linalg.cholesky(Gd), torch.linalg.cholesky(Ad)
    U, S, Vh = torch.linalg.svd(LG.T @ R @ LA)
    Wr = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    return torch.linalg.solve(LG.T, Wr) @ torch.linalg.inv(LA)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_best_rank_matches_the_whitened_reference(rank: int) -> None:
    f = factors()
    R = torch.randn(9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    B, A = KFAC_MEMORY["kfac"](R, f, rank, 0.1)
    M = B.double() @ A.double()
    assert torch.linalg.matrix_rank(M) == rank
    assert torch.allclose(M, reference_best_rank(R, f.G, f.A, rank, 0.1), rtol=1e-4, atol=1e-5)


def test_best_rank_beats_every_other_builder_and_plain_svd_under_the_kfac_loss() -> None:
    f = factors()
    R = torch.randn(9, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(R)
    losses = []
    for r in (1, 2, 4):
        best = kfac_loss(R - kfac_memory("kfac", R, f, r, damp=0.1, dtype="fp32").to_dense().double(), f, 0.1)
        svd = kfac_loss(R - U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], f, 0.1)
        for other in ("kfac-eigen", "kfac-lambda"):
            o = kfac_loss(R - kfac_memory(other, R, f, r, dtype="fp32").to_dense().double(), f, 0.1)
            assert best <= o + 1e-9, (r, other)
        assert best <= svd + 1e-9
        losses.append(best)
    assert losses[0] > losses[1] > losses[2] and kfac_loss(R, f, 0.1) > losses[0]
    full = kfac_memory("kfac", R, f, 7, damp=0.1, dtype="fp32").to_dense().double()
    assert torch.allclose(full, R, atol=1e-5)


def test_eigen_directions_keep_the_side_and_direction_that_carry_the_score() -> None:
    """R lies on one input eigen-direction: kfac-eigen recovers it exactly at rank 1; kfac-lambda, blind
    to R, keeps the top-eigenvalue direction instead and misses it."""
    f = factors().eigen()
    j = 2  # a low-curvature input direction
    R = torch.outer(torch.arange(1.0, 10.0, dtype=torch.float64), f.QA[:, j])
    M = kfac_memory("kfac-eigen", R, f, 1, dtype="fp32").to_dense().double()
    assert torch.allclose(M, R, atol=1e-5)
    L = kfac_memory("kfac-lambda", R, f, 1, dtype="fp32").to_dense().double()
    assert (L - R).norm() > 0.5 * R.norm()


def test_rank_for_bits_and_refusals() -> None:
    assert rank_for_bits(16 * (9 + 7) * 3 + 5, 9, 7) == 3 and rank_for_bits(10, 9, 7) == 0
    assert rank_for_bits(1e12, 9, 7) == 7
    with pytest.raises(ValueError, match="budget"):
        rank_for_bits(-1, 9, 7)
    f = factors()
    with pytest.raises(ValueError, match="shape"):
        KFAC_MEMORY["kfac"](torch.zeros(7, 9), f, 1, 0.1)
    with pytest.raises(ValueError, match="rank"):
        KFAC_MEMORY["kfac"](torch.zeros(9, 7), f, 0, 0.1)
    with pytest.raises(KeyError):
        kfac_memory("nope", torch.zeros(9, 7), f, 1)


def test_obs_and_diag_selectors_take_kfac_curvature_without_a_special_case() -> None:
    """obs under K-FAC is R^2 / diag((G_d ⊗ A_d)^-1) and diag is R^2 diag(G ⊗ A), against dense Kronecker products;
    a bare tensor still means GPTQ's layer Hessian (same scores as before)."""
    from libortho.curvature.operator import KFACCurvature, LayerHessian
    from libortho.select import impact_scores

    f = factors()
    R = torch.randn(9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Gd = f.G + 0.1 * torch.trace(f.G) / 9 * torch.eye(9, dtype=torch.float64)
    Ad = f.A + 0.1 * torch.trace(f.A) / 7 * torch.eye(7, dtype=torch.float64)
    inv = torch.diagonal(torch.linalg.inv(torch.kron(Gd, Ad))).reshape(9, 7)
    obs = impact_scores("obs", R.float(), KFACCurvature(f, damp=0.1))
    assert torch.allclose(obs.double(), R**2 / inv, rtol=1e-4)
    diag = impact_scores("diag", R.float(), KFACCurvature(f))
    assert torch.allclose(diag.double(), R**2 * torch.diagonal(torch.kron(f.G, f.A)).reshape(9, 7), rtol=1e-4)
    H = f.A.float()
    assert torch.equal(impact_scores("obs", R.float(), H), impact_scores("obs", R.float(), LayerHessian(H)))
    with pytest.raises(ValueError, match="K-FAC factors are for"):
        impact_scores("obs", R.float().T, KFACCurvature(f))
