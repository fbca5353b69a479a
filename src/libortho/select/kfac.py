"""Memory streams chosen under K-FAC curvature: the best rank-r correction of a residual, or eigen-directions.

Under K-FAC the loss increase of a weight error ``E`` (d_out x d_in) is ``tr(G E A E^T)`` = the sum of
``C_ij^2 λ_G,i λ_A,j`` with ``C = Q_G^T E Q_A`` in the factors' eigenbasis: diagonal there, so each
eigen-component's share is exact. A memory stream that corrects part of the residual ``R = W - Q`` (or
of a task vector) costs bits, and in factored form the columns of the eigenbases count: restoring a
set of components ``(i, j)`` needs ``Q_G[:, i]`` and ``Q_A[:, j]`` besides the coefficients. Every form
here is therefore stored as a low-rank update ``B A`` (:class:`~libortho.streams.LowRankMemory`): a
product ``Q_G[:, I] C[I, J] Q_A[:, J]^T`` has rank ``min(|I|, |J|)`` and two factors of that rank
never cost more than three. Rank is set by bits (:func:`rank_for_bits`), so a K-FAC stream is
compared with a sparse stream at the same bits per parameter.

Builders (registry :data:`KFAC_MEMORY`, each ``(R, factors, rank, damp) -> (B, A)``):

* ``kfac``: the rank-r ``M`` minimising ``tr(G (R - M) A (R - M)^T)`` with damped factors:
  ``M = G^-1/2 [G^1/2 R A^1/2]_r A^-1/2`` (Eckart-Young in the whitened space). Score
  ``C_ij^2 λ_G,i λ_A,j`` in closed form; the optimum of that objective at the given rank.
* ``kfac-eigen``: keep ``r`` whole eigen-directions of one side (input ``Q_A`` or output ``Q_G``,
  whichever carries more score), each ranked by its summed ``C_ij^2 λ_G,i λ_A,j``; ``M`` projects
  ``R`` onto them.
* ``kfac-lambda``: the same with directions ranked by their eigenvalue alone (``λ_G,i λ_A,j``
  summed; blind to the residual): the curvature-only control the issue asks for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from libortho.curvature.kfac import KFACFactors
from libortho.registry import Registry
from libortho.streams import LowRankMemory

Builder = Callable[[torch.Tensor, KFACFactors, int, float], tuple[torch.Tensor, torch.Tensor]]
KFAC_MEMORY: Registry[Builder] = Registry("K-FAC memory builder")


def rank_for_bits(bits: float, d_out: int, d_in: int, value_bits: int = 16) -> int:
    """The largest rank whose two factors (``r (d_out + d_in)`` values) fit in ``bits``."""
    if bits < 0:
        raise ValueError(f"bit budget must be >= 0, got {bits}")
    return min(int(bits // (value_bits * (d_out + d_in))), min(d_out, d_in))


def kfac_loss(E: torch.Tensor, f: KFACFactors, damp: float = 0.0) -> float:
    """``tr(G_d E A_d E^T)`` with each factor damped by ``damp`` times its mean eigenvalue."""
    sG, sA = _damped_sqrt(f, damp)
    C = f.rotate(E.double())
    return float(((sG[:, None] * C * sA[None, :]) ** 2).sum())


def _damped_sqrt(f: KFACFactors, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    if damp < 0:
        raise ValueError(f"damping must be >= 0, got {damp}")
    f.eigen()
    lg = f.lamG + damp * float(f.lamG.mean())
    la = f.lamA + damp * float(f.lamA.mean())
    return lg.sqrt(), la.sqrt()


@KFAC_MEMORY.register("kfac")
def kfac_best_rank(R: torch.Tensor, f: KFACFactors, rank: int, damp: float = 0.1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the rank-``rank`` minimiser of the damped K-FAC loss of ``R - M`` (module docstring)."""
    _check(R, f, rank)
    if f.ekfac is not None:
        raise ValueError("the best rank-r memory whitens by the Kronecker factors; these carry EK-FAC eigenvalues "
                         "(not a product): drop ekfac, or use kfac-eigen, which ranks by them")
    sG, sA = _damped_sqrt(f, damp)
    if float(sG.min()) == 0.0 or float(sA.min()) == 0.0:
        raise ValueError("a K-FAC factor is singular: use damp > 0")
    W = sG[:, None] * f.rotate(R.double()) * sA[None, :]  # whitened residual in the eigenbasis
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    B = f.QG @ ((U[:, :rank] * S[:rank]) / sG[:, None])
    A = (Vh[:rank] / sA[None, :]) @ f.QA.T
    return B.float(), A.float()


def _directions(R: torch.Tensor, f: KFACFactors, rank: int, use_residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check(R, f, rank)
    lam = torch.outer(f.lamG, f.lamA) if f.ekfac is None else f.ekfac.double()
    score = (f.rotate(R.double()) ** 2) * lam if use_residual else lam
    col, row = score.sum(0), score.sum(1)  # per input direction j, per output direction i
    top_in, top_out = col.topk(rank).indices, row.topk(rank).indices
    if float(col[top_in].sum()) >= float(row[top_out].sum()):
        Q = f.QA[:, top_in]  # keep input directions: M = R Q Q^T
        return (R.double() @ Q).float(), Q.T.float()
    Q = f.QG[:, top_out]  # keep output directions: M = Q Q^T R
    return Q.float(), (Q.T @ R.double()).float()


@KFAC_MEMORY.register("kfac-eigen")
def kfac_eigen_directions(R: torch.Tensor, f: KFACFactors, rank: int, damp: float = 0.1
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank`` eigen-directions of one side ranked by summed ``C_ij^2 λ_G,i λ_A,j`` (EK-FAC's eigenvalues when
    fitted); ``R`` projected onto them. ``damp`` is unused: nothing is inverted, and the ranking reads the
    undamped eigenvalues."""
    return _directions(R, f, rank, use_residual=True)


@KFAC_MEMORY.register("kfac-lambda")
def kfac_lambda_directions(R: torch.Tensor, f: KFACFactors, rank: int, damp: float = 0.1
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``kfac-eigen`` with directions ranked by eigenvalues alone (the residual is not looked at)."""
    return _directions(R, f, rank, use_residual=False)


def _check(R: torch.Tensor, f: KFACFactors, rank: int) -> None:
    if tuple(R.shape) != f.shape:
        raise ValueError(f"residual has shape {tuple(R.shape)}, the K-FAC factors are for {f.shape}")
    if not 1 <= rank <= min(f.shape):
        raise ValueError(f"rank must be in [1, {min(f.shape)}], got {rank}")


def kfac_memory(name: str, R: torch.Tensor, f: KFACFactors, rank: int, damp: float = 0.1,
                dtype: str = "fp16") -> LowRankMemory:
    """The :class:`~libortho.streams.LowRankMemory` built by ``name`` (see :data:`KFAC_MEMORY`)."""
    B, A = KFAC_MEMORY[name](R, f, rank, damp)
    return LowRankMemory.from_factors(B, A, dtype=dtype)
