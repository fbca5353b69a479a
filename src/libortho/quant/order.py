"""Column orders for error-feedback quantization (GPTQ, Babai): natural, act-order, min-pivot.

In the lattice view (:mod:`libortho.quant.babai`) GPTQ is Babai's nearest-plane algorithm and the
column processed k-th carries the Gram-Schmidt pivot ``D_k = 1 / [H_rest^-1]_jj``, where ``H_rest``
is the Hessian restricted to the columns not yet processed: the error of that column is at most
``s^2 D_k / 4`` (no clipping). The order decides the pivots (their product, ``det H``, does not):

* ``natural``: columns as stored;
* ``act``: GPTQ's act-order, decreasing ``diag(H)``;
* ``min_pivot``: the lattice view's greedy order. Babai fixes GPTQ's *last* column first, and that
  column's pivot is its plain ``H_jj``; the column before it has the Schur complement of ``H`` on the
  columns left, and so on. Built from the back, each step takes the remaining column with the
  smallest pivot, then eliminates it from ``H`` (a rank-1 Schur update): diagonally pivoted
  Cholesky of ``H`` with the smallest pivot first, read in reverse. The largest pivots, which
  dominate the bound's sum, are kept as small as the greedy choice can make them. (Act-order,
  decreasing ``diag(H)``, puts the smallest unconditioned diagonal last too, without the updates.)
"""

from __future__ import annotations

import numpy as np
import torch

from libortho.curvature.damping import damped

ORDERS = ("natural", "act", "min_pivot")


def min_pivot_order(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, pivots) for the (already damped, positive definite) ``H``: GPTQ's processing order, built from
    the back by smallest pivot.

    ``pivots[k]`` is the nearest-plane pivot ``D_k`` of the column processed k-th.
    """
    P = H.detach().double().numpy().copy()
    n = P.shape[0]
    free = np.ones(n, dtype=bool)
    order, pivots = np.empty(n, dtype=np.int64), np.empty(n)
    for k in range(n - 1, -1, -1):  # the last processed column first
        j = int(np.argmin(np.where(free, np.diagonal(P), np.inf)))
        order[k], pivots[k], free[j] = j, P[j, j], False
        P -= np.outer(P[:, j], P[j, :]) / P[j, j]
    return torch.from_numpy(order), torch.from_numpy(pivots)


def column_order(H: torch.Tensor, order: str, damp: float) -> torch.Tensor:
    """The processing order (a permutation of the columns) that ``order`` names, for the layer Hessian ``H``."""
    n = H.shape[0]
    if order == "natural":
        return torch.arange(n)
    if order == "act":
        return torch.argsort(torch.diagonal(H), descending=True, stable=True)
    if order == "min_pivot":
        return min_pivot_order(damped(H, damp, torch.float64))[0]
    raise ValueError(f"unknown column order {order!r}; available: {', '.join(ORDERS)}")
