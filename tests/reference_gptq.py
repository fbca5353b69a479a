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
    return reference_gptq_joint(W, H, cfg, damp, 0.0)[0]


def _rtn_scores(block: np.ndarray, scale: np.ndarray, zero: np.ndarray, hinv_diag: np.ndarray, bits: int) -> np.ndarray:
    """OBS saliency ``(w - rtn(w))^2 / [H^-1]_jj`` of every entry of ``block`` on the given grid."""
    out = np.zeros_like(block)
    for r in range(block.shape[0]):
        for c in range(block.shape[1]):
            out[r, c] = (block[r, c] - quantize(block[r, c], scale[r], zero[r], bits)) ** 2 / hinv_diag[c]
    return out


def _fit_marking(block: np.ndarray, hinv_diag: np.ndarray, tau: float, cfg: QuantConfig):
    """Joint rule at a grid fit: mark entries scoring above tau on the group's own grid, then refit the grid
    with each marked entry replaced by the mean of its row's unmarked entries."""
    scale, zero = fit(block, cfg.bits, cfg.symmetric)
    marked = _rtn_scores(block, scale, zero, hinv_diag, cfg.bits) > tau
    if marked.any():
        fill = block.copy()
        for r in range(block.shape[0]):
            others = [block[r, c] for c in range(block.shape[1]) if not marked[r, c]]
            mean = sum(others) / max(len(others), 1)
            for c in range(block.shape[1]):
                if marked[r, c]:
                    fill[r, c] = mean
        scale, zero = fit(fill, cfg.bits, cfg.symmetric)
    return scale, zero, marked


def reference_gptq_joint(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, damp: float, outliers: float,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, outlier mask, outlier values). ``outliers`` > 0 runs the documented joint selection: the
    threshold keeps the top fraction of the RTN residual's OBS scores of the original weights; marked
    entries are quantized on the refit grid, carry no error forward, and store ``w - q`` at their turn."""
    W, H = W.double().numpy().copy(), H.double().numpy().copy()
    n, gs = W.shape[1], cfg.group_size
    for j in range(n):
        if H[j, j] == 0:  # dead input: weight zeroed, H_jj = 1
            H[j, j] = 1.0
            W[:, j] = 0.0
    mean_diag = sum(H[j, j] for j in range(n)) / n
    Hinv = invert(H + damp * mean_diag * np.eye(n))
    hinv_diag = np.diag(Hinv).copy()
    joint = outliers > 0
    marked = np.zeros(W.shape, dtype=bool)
    tau = math.inf
    if joint:
        scores = np.concatenate([_rtn_scores(W[:, g:g + gs], *fit(W[:, g:g + gs], cfg.bits, cfg.symmetric),
                                             hinv_diag[g:g + gs], cfg.bits) for g in range(0, n, gs)], 1)
        k = max(1, round(outliers * scores.size))
        tau = sorted(scores.ravel(), reverse=True)[k - 1]
    order = list(range(n))
    static = {}
    if cfg.act_order:  # groups fitted once on the original columns, columns visited by decreasing H_jj
        for g in range(-(-n // gs)):
            sl = slice(g * gs, (g + 1) * gs)
            if joint:
                s_, z_, marked[:, sl] = _fit_marking(W[:, sl], hinv_diag[sl], tau, cfg)
                static[g] = (s_, z_)
            else:
                static[g] = fit(W[:, sl], cfg.bits, cfg.symmetric)
        order = sorted(range(n), key=lambda j: -H[j, j])  # sorted() is stable: ties keep index order
    Q, values = np.zeros_like(W), np.zeros_like(W)
    remaining = list(order)
    scale = zero = None
    for q in order:
        if cfg.act_order:
            scale, zero = static[q // gs]
        elif q % gs == 0:
            if joint:
                scale, zero, marked[:, q:q + gs] = _fit_marking(W[:, q:q + gs], hinv_diag[q:q + gs], tau, cfg)
            else:
                scale, zero = fit(W[:, q:q + gs], cfg.bits, cfg.symmetric)
        for r in range(W.shape[0]):
            Q[r, q] = quantize(W[r, q], scale[r], zero[r], cfg.bits)
        remaining.remove(q)
        err = (W[:, q] - Q[:, q]) / Hinv[q, q]
        values[marked[:, q], q] = (W[:, q] - Q[:, q])[marked[:, q]]
        err[marked[:, q]] = 0.0  # kept exact by the ortho stream
        for j in remaining:
            W[:, j] -= err * Hinv[q, j]
        Hinv = Hinv - np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return torch.from_numpy(Q), torch.from_numpy(marked), torch.from_numpy(values)
