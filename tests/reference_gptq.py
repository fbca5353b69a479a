"""A slow, obviously-correct GPTQ written without the library: own grid, own inverse, plain loops.

Column by column on an explicit inverse Hessian (OBS updates): after quantizing column q, every
later column absorbs the error through H^-1, and q is eliminated from H^-1 by a rank-1 Schur
update. The grid is the documented min-max grid (range including 0, scale rounded up to 8
significant bits with a floor of 2^-14, integer zero point in range); only the config object is
shared with the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from libortho.config import QuantConfig


def grid_scale(raw: float) -> float:
    """Smallest number with 8 significant bits (a bf16 value) >= max(raw, 2^-14)."""
    x = max(raw, 2.0**-14)
    m, e = math.frexp(x)  # x = m * 2^e, 0.5 <= m < 1
    return math.ceil(m * 256) / 256 * 2.0**e


def fit(column_group: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero per row of ``column_group (rows, cols)``, one row at a time."""
    maxq = 2**bits - 1
    scales, zeros = np.zeros(column_group.shape[0]), np.zeros(column_group.shape[0])
    for r, row in enumerate(column_group):
        if symmetric:
            scales[r] = grid_scale(2 * max(abs(v) for v in row) / maxq)
            zeros[r] = (maxq + 1) / 2
        else:
            lo, hi = min(min(row), 0.0), max(max(row), 0.0)
            scales[r] = grid_scale((hi - lo) / maxq)
            zeros[r] = min(max(round(-lo / scales[r]), 0), maxq)
    return scales, zeros


def quantize(w: float, scale: float, zero: float, bits: int) -> float:
    """Dequantized value of the nearest code: ``(clamp(round(w / s + z), 0, 2^b - 1) - z) * s``."""
    code = min(max(round(w / scale + zero), 0), 2**bits - 1)  # round() is half-to-even, like torch.round
    return (code - zero) * scale


def invert(A: np.ndarray) -> np.ndarray:
    """Gauss-Jordan inverse with partial pivoting, row operations written out."""
    n = A.shape[0]
    M = np.hstack([A.astype(np.float64), np.eye(n)])
    for c in range(n):
        p = c + int(np.argmax(np.abs(M[c:, c])))
        M[[c, p]] = M[[p, c]]
        M[c] /= M[c, c]
        for r in range(n):
            if r != c:
                M[r] -= M[r, c] * M[c]
    return M[:, n:]


def reference_gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, damp: float) -> torch.Tensor:
    """Dequantized Q (float64). Same grouping, damping, dead-input and act-order rules as documented."""
    W, H = W.double().numpy().copy(), H.double().numpy().copy()
    n, gs = W.shape[1], cfg.group_size
    for j in range(n):
        if H[j, j] == 0:  # dead input: weight zeroed, H_jj = 1
            H[j, j] = 1.0
            W[:, j] = 0.0
    mean_diag = sum(H[j, j] for j in range(n)) / n
    Hinv = invert(H + damp * mean_diag * np.eye(n))
    order = list(range(n))
    static = {}
    if cfg.act_order:  # groups fitted once on the original columns, columns visited by decreasing H_jj
        static = {g: fit(W[:, g * gs:(g + 1) * gs], cfg.bits, cfg.symmetric) for g in range(-(-n // gs))}
        order = sorted(range(n), key=lambda j: -H[j, j])  # sorted() is stable: ties keep index order
    Q = np.zeros_like(W)
    remaining = list(order)
    scale = zero = None
    for q in order:
        if cfg.act_order:
            scale, zero = static[q // gs]
        elif q % gs == 0:
            scale, zero = fit(W[:, q:q + gs], cfg.bits, cfg.symmetric)
        for r in range(W.shape[0]):
            Q[r, q] = quantize(W[r, q], scale[r], zero[r], cfg.bits)
        remaining.remove(q)
        err = (W[:, q] - Q[:, q]) / Hinv[q, q]
        for j in remaining:
            W[:, j] -= err * Hinv[q, j]
        Hinv = Hinv - np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return torch.from_numpy(Q)
