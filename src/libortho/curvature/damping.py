"""One damping rule for every inverse of a layer Hessian (GPTQ's update, OBS scores, optimal values).

A layer Hessian ``H = 2/n X^T X`` is singular wherever an input never fires and ill-conditioned
elsewhere. Everything that inverts it here uses the same rule, GPTQ's: a dead input (``H_jj = 0``)
gets ``H_jj = 1``, then ``damp * mean(diag H)`` is added to the diagonal; where the Cholesky
factorisation still fails, ``damp`` is raised tenfold, at most :data:`MAX_DAMP_RAISES` times, and the
damping actually used is returned so callers can report it. (K-FAC factors are damped in the same
spirit, each by a fraction of its own mean eigenvalue: :meth:`~libortho.curvature.kfac.KFACFactors.damped_eigenvalues`.)
"""

from __future__ import annotations

import torch

MAX_DAMP_RAISES = 6


def damped(H: torch.Tensor, damp: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of ``H`` (in ``dtype``) with dead inputs set to 1 and ``damp * mean(diag)`` added to the diagonal."""
    if damp < 0:
        raise ValueError(f"damping must be >= 0, got {damp}")
    Hd = H.to(dtype or H.dtype, copy=True)
    diag = torch.diagonal(Hd)
    diag[diag == 0] = 1.0
    diag += damp * float(diag.mean())
    return Hd


def damped_cholesky(H: torch.Tensor, damp: float, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, float]:
    """(lower Cholesky factor of the damped ``H``, the damping used), raising ``damp`` on failure."""
    for _ in range(MAX_DAMP_RAISES + 1):
        L, info = torch.linalg.cholesky_ex(damped(H, damp, dtype))
        if int(info) == 0:
            return L, damp
        damp *= 10
    raise ValueError(f"Hessian is not positive definite even with damping {damp / 10:g} x mean(diag H)")


def inverse_upper_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(upper Cholesky factor ``U`` of the damped ``H^-1``, so ``H^-1 = U^T U``; the damping used): GPTQ's factor."""
    for _ in range(MAX_DAMP_RAISES + 1):
        L, info = torch.linalg.cholesky_ex(damped(H, damp))
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, damp
        damp *= 10
    raise ValueError(f"Hessian is not positive definite even with damping {damp / 10:g} x mean(diag H)")


def inverse_diag(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(``diag(H_d^-1)`` in fp64 for the damped ``H_d``, the damping used)."""
    L, used = damped_cholesky(H, damp, torch.float64)
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype), upper=False)
    return (Linv * Linv).sum(0), used
