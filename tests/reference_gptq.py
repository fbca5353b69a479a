"""A slow, obviously-correct GPTQ: column by column on an explicit inverse Hessian (OBS updates)."""

from __future__ import annotations

import torch

from libortho.config import QuantConfig
from libortho.quant.grid import dequantize_with_params, fit_grid, fit_group_params, quantize_with_params


def reference_gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, damp: float) -> torch.Tensor:
    """Dequantized Q. After quantizing column q, every later column absorbs the error via H^-1 and
    q is eliminated from H^-1 by a rank-1 Schur update. Same grouping and damping rules."""
    W, H = W.clone().double(), H.clone().double()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n = W.shape[1]
    order = list(range(n))
    if cfg.act_order:
        static = [t.double() for t in fit_grid(W, cfg)]
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist()
    Hinv = torch.linalg.inv(H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype))
    Q = torch.zeros_like(W)
    scale = zero = None
    remaining = list(order)
    for q in order:
        g = q // cfg.group_size
        if cfg.act_order:
            scale, zero = static[0][:, g], static[1][:, g]
        elif q % cfg.group_size == 0:
            scale, zero = fit_group_params(W[:, q:q + cfg.group_size], cfg.bits, cfg.symmetric, cfg.grid)
        Q[:, q] = dequantize_with_params(quantize_with_params(W[:, q], scale, zero, cfg.bits), scale, zero)
        remaining.remove(q)
        err = (W[:, q] - Q[:, q]) / Hinv[q, q]
        for j in remaining:
            W[:, j] -= err * Hinv[q, j]
        Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    return Q
