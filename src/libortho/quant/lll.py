"""LLL basis reduction of a Hessian lattice (fpylll) and what it does to nearest-plane quantization.

Babai's bound, ``1/4 sum_k ||b*_k||^2`` per unit step, depends on the basis only through its
Gram-Schmidt norms. LLL (delta = 0.99) replaces the Cholesky basis ``B`` of a Hessian block by
``T B`` with ``T`` unimodular (integer, ``|det T| = 1``): the same lattice, a flatter Gram-Schmidt
profile, a smaller bound, and usually a smaller unconstrained closest-vector error.

What it cannot keep is the box. A stored INT-b grid needs every *code* ``c = c' T`` in
``[0, 2^b - 1]``; a unimodular change of basis mixes coordinates, so the box in code space is a
skewed parallelepiped in the new coefficients and nearest-plane on ``T B`` cannot respect it as it
goes. :func:`reduce_and_compare` therefore reports the clipped error honestly: the reduced
solution's codes clamped into the box after the fact, beside GPTQ's box-constrained nearest plane.

fpylll works on integer matrices, so the basis is scaled by ``2^precision_bits / max|B|`` and
rounded; ``T`` found there is applied to the real basis (it is unimodular whatever the rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from libortho.quant.babai import _nearest_plane, gram_schmidt_sq


@dataclass(frozen=True)
class Reduction:
    """``basis = transform @ original``: ``transform`` is unimodular (int64); GS norms are squared, in row order."""

    basis: torch.Tensor
    transform: torch.Tensor
    gs_before: torch.Tensor
    gs_after: torch.Tensor
    seconds: float


def lll_reduce(basis: torch.Tensor, delta: float = 0.99, precision_bits: int = 40) -> Reduction:
    """LLL-reduce the rows of the real ``basis (n, n)`` with fpylll (``delta``; eta 0.51)."""
    import time

    from fpylll import LLL, IntegerMatrix

    if not 0.25 < delta <= 1:
        raise ValueError(f"LLL needs 0.25 < delta <= 1, got {delta}")
    n = basis.shape[0]
    if basis.shape != (n, n):
        raise ValueError(f"basis must be square, got {tuple(basis.shape)}")
    B = basis.double()
    scaled = torch.round(B * (2.0**precision_bits / float(B.abs().max()))).to(torch.int64)
    A = IntegerMatrix.from_matrix(scaled.tolist())
    U = IntegerMatrix.identity(n)
    t0 = time.perf_counter()
    LLL.reduction(A, U, delta=delta)
    seconds = time.perf_counter() - t0
    T = torch.tensor([[U[i, j] for j in range(n)] for i in range(n)], dtype=torch.int64)
    reduced = T.double() @ B
    return Reduction(reduced, T, gram_schmidt_sq(B), gram_schmidt_sq(reduced), seconds)


def is_unimodular(T: torch.Tensor) -> bool:
    """Integer square matrix with determinant +-1 (exact, by fraction-free Bareiss elimination)."""
    M = [[int(v) for v in row] for row in T.tolist()]
    n, sign, prev = len(M), 1, 1
    for k in range(n - 1):
        if M[k][k] == 0:
            swap = next((i for i in range(k + 1, n) if M[i][k] != 0), None)
            if swap is None:
                return False
            M[k], M[swap], sign = M[swap], M[k], -sign
        for i in range(k + 1, n):
            for j in range(k + 1, n):
                M[i][j] = (M[i][j] * M[k][k] - M[i][k] * M[k][j]) // prev
        prev = M[k][k]
    return abs(sign * M[n - 1][n - 1]) == 1


@dataclass(frozen=True)
class BlockComparison:
    """Nearest-plane on one Hessian block before and after LLL, errors summed over rows (step 1 units x s_r^2)."""

    dim: int
    bound_before: float
    bound_after: float
    error_before: float
    error_after: float
    clipped_error_before: float
    clipped_error_after: float
    rtn_error: float
    outside_box_after: float
    gs_before: list[float]
    gs_after: list[float]
    lll_seconds: float

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return dict(self.__dict__)


def _errors(codes: torch.Tensor, y: torch.Tensor, H: torch.Tensor, s2: torch.Tensor) -> float:
    """Sum over rows of ``s_r^2 (c_r - y_r) H (c_r - y_r)^T``."""
    E = codes - y
    return float((((E @ H) * E).sum(1) * s2).sum())


def reduce_and_compare(H: torch.Tensor, y: torch.Tensor, s: torch.Tensor, maxq: int, delta: float = 0.99
                       ) -> BlockComparison:
    """Quantize targets ``y (m, n)`` (integer coordinates ``w / s + z`` of one block, one step ``s_r`` per row)
    against the (damped) block Hessian ``H (n, n)``: nearest plane on its Cholesky basis and on the
    LLL-reduced basis, unconstrained and clipped to ``[0, maxq]``; RTN for scale."""
    H = H.double()
    y = y.double()
    s2 = s.double() ** 2
    B = torch.linalg.cholesky(H)  # rows: basis, B B^T = H
    red = lll_reduce(B, delta)
    target = y @ B
    before, _ = _nearest_plane(B, target, None, None, None)
    boxed, _ = _nearest_plane(B, target, None, 0.0, float(maxq))
    coeff_after, _ = _nearest_plane(red.basis, target, None, None, None)
    after = coeff_after @ red.transform.double()  # back to codes: c = c' T
    outside = float(((after < 0) | (after > maxq)).double().mean())
    return BlockComparison(
        dim=H.shape[0],
        bound_before=float(0.25 * red.gs_before.sum() * s2.sum()),
        bound_after=float(0.25 * red.gs_after.sum() * s2.sum()),
        error_before=_errors(before, y, H, s2), error_after=_errors(after, y, H, s2),
        clipped_error_before=_errors(boxed, y, H, s2),
        clipped_error_after=_errors(after.clamp(0, maxq), y, H, s2),
        rtn_error=_errors(torch.round(y).clamp(0, maxq), y, H, s2),
        outside_box_after=outside,
        gs_before=red.gs_before.tolist(), gs_after=red.gs_after.tolist(), lll_seconds=red.seconds)


def log_profile(gs_sq: list[float]) -> np.ndarray:
    """``log2 ||b*_k||`` (half the log of the squared norms), for plotting profiles."""
    return 0.5 * np.log2(np.asarray(gs_sq))
