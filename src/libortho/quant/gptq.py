"""GPTQ: quantize columns one at a time, pushing each column's error onto the later columns.

The update uses the upper Cholesky factor U of the damped inverse Hessian: quantizing column q
with error e costs ``e^2 / U_qq^2`` and is compensated by ``W[:, q:] -= e / U_qq * U[q, q:]``.
Columns go in blocks with lazy updates of the columns after the block. Group parameters are fit
on the error-updated columns when a group's first column is reached, or, with act-order, once
up front on the original columns (static groups), so the stored layout stays in column order.

Joint outlier selection (SpQR's idea, ``outliers > 0``): when a group's grid is fit, the entries
whose round-to-nearest error on that grid scores above a layer threshold (OBS saliency
``r^2 / [H^-1]_jj``; the threshold keeps the top ``outliers`` fraction of the RTN residual of the
original weights) are marked as outliers, and the grid is refit without them, so they no longer
stretch their rows' ranges. In the column loop they are kept exact: their error is not pushed
onto later columns, which compensate only the entries that stay quantized. They come back as the
ortho stream's support with their in-loop residuals (count near the budget; the selector trims or
fills it exactly). The base codes on them are the refit grid's: at alpha = 0 those entries are
clipped and uncompensated, so joint selection trades alpha = 0 quality for alpha = 1 quality.

Lattice view (:mod:`libortho.quant.babai`): GPTQ is Babai's nearest-plane algorithm on the lattice of
the damped Hessian, so ``2 * info["loss"]`` (the error ``sum_r e_r H e_r^T``) is at most
``info["babai_bound"] = 1/4 sum_k D_k sum_r s_rk^2`` (pivots ``D_k = 1 / U_kk^2``) when no entry is
clipped; ``info["clipped"]`` counts the entries whose nearest code left ``[0, 2^b - 1]``.
Column orders (natural, act-order, min-pivot): :mod:`libortho.quant.order`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from libortho.config import QuantConfig
from libortho.curvature.damping import inverse_upper_cholesky
from libortho.quant.grid import (
    QuantResult,
    check_weight,
    fit_grid,
    fit_group_params,
)
from libortho.quant.order import column_order


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy W and H; zero the weights of dead inputs (H_jj == 0) and set their H_jj to 1."""
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(W.shape[1], W.shape[1])} for W {tuple(W.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or inf")
    W, H = W.clone(), H.clone().to(W.dtype)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` and the damping used (raised x10 on failure).

    The one damping rule of :mod:`libortho.curvature.damping`.
    """
    return inverse_upper_cholesky(H, damp)


def _group_columns(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor,
                   i1: int, i: int, end: int) -> torch.Tensor:
    """Current (fully error-updated) values of columns ``i1+i .. end`` inside and past the block."""
    i2 = i1 + W1.shape[1]
    inside = W1[:, i:min(end, i2) - i1]
    if end <= i2:
        return inside
    pending = Err1[:, :i] @ U[i1:i1 + i, i2:end] if i else 0.0
    return torch.cat([inside, W[:, i2:end] - pending], 1)


def _outlier_threshold(W: torch.Tensor, cfg: QuantConfig, hinv_diag: torch.Tensor, fraction: float,
                       parts: list[int]) -> torch.Tensor:
    """Per row, the OBS saliency above which an entry of the RTN residual of ``W`` is among the top
    ``fraction`` of its part (consecutive row blocks of sizes ``parts``: stacked matrices)."""
    s, z = fit_grid(W, cfg)
    scores = (W - _rtn_dequant(W, s, z, cfg)) ** 2 / hinv_diag
    tau, start = torch.empty(W.shape[0], dtype=W.dtype), 0
    for n in parts:
        part = scores[start:start + n].flatten()
        k = max(1, int(round(fraction * part.numel())))
        tau[start:start + n] = torch.topk(part, k, sorted=False).values.min()
        start += n
    return tau


def _rtn_dequant(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Round-to-nearest of ``W`` on per-group params ``s, z (d_out, n_groups)``, dequantized."""
    idx = torch.arange(W.shape[1]) // cfg.group_size
    s, z = s[:, idx].to(W.dtype), z[:, idx].to(W.dtype)
    return (torch.clamp(torch.round(W / s + z), 0, 2**cfg.bits - 1) - z) * s


def _fit_without(w: torch.Tensor, hinv: torch.Tensor, tau: torch.Tensor, cfg: QuantConfig,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mark the entries of group ``w (rows, cols)`` scoring above their row's ``tau`` on its own grid, then fit
    the grid again with them replaced by their row's mean of the others (out of the range fit)."""
    s, z = fit_group_params(w, cfg.bits, cfg.symmetric, cfg.grid)
    q = (torch.clamp(torch.round(w / s[:, None] + z[:, None]), 0, 2**cfg.bits - 1) - z[:, None]) * s[:, None]
    out = (w - q) ** 2 / hinv[None, :] > tau[:, None]
    if not out.any():
        return s, z, out
    keep = (~out).to(w.dtype)
    mean = (w * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    s, z = fit_group_params(torch.where(out, mean, w), cfg.bits, cfg.symmetric, cfg.grid)
    return s, z, out


def gptq_quantize(W: torch.Tensor, cfg: QuantConfig, H: torch.Tensor, outliers: float = 0.0,
                  parts: list[int] | None = None) -> QuantResult:
    """GPTQ of ``W (d_out, d_in)`` against the layer Hessian ``H (d_in, d_in)``.

    ``outliers`` > 0 selects about that fraction of entries jointly (module docstring): ``info`` then
    holds ``outlier_mask`` (bool, W's shape) and ``outlier_values`` (in-loop residual on it, 0 elsewhere).
    ``parts``: row counts of matrices stacked in W (one shared H); each gets its own threshold, so
    the stacked run equals separate ones.
    """
    check_weight(W)
    if H is None:
        raise ValueError("GPTQ needs the layer Hessian H")
    if not 0 <= outliers < 1:  # also refuses NaN
        raise ValueError(f"outliers must be a fraction in [0, 1), got {outliers}")
    parts = [W.shape[0]] if parts is None else list(parts)
    if sum(parts) != W.shape[0] or any(n <= 0 for n in parts):
        raise ValueError(f"row parts {parts} do not partition {W.shape[0]} rows")
    joint = outliers > 0
    t0 = time.perf_counter()
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W, H, dead = prepare_hessian(W.detach().to(dtype), H.detach())
    d_out, d_in = W.shape
    g, maxq = cfg.group_size, 2**cfg.bits - 1
    ng = (d_in + g - 1) // g
    scales = torch.zeros(d_out, ng, dtype=dtype)
    zeros = torch.zeros(d_out, ng, dtype=dtype)
    static = cfg.static_groups
    perm = column_order(H, cfg.order, cfg.damp)
    t_chol = time.perf_counter()
    U, damp = inverse_cholesky(H[perm][:, perm] if static else H, cfg.damp)
    t_chol = time.perf_counter() - t_chol
    if joint:
        hinv = torch.empty(d_in, dtype=dtype)
        hinv[perm] = (U * U).sum(0)  # diag of the damped H^-1 = U^T U, in column order
        tau = _outlier_threshold(W, cfg, hinv, outliers, parts)
        pre = torch.zeros(d_out, d_in, dtype=torch.bool)  # outliers marked at grid fits, column order
    if static:
        if joint:  # static groups: fit on the original columns, outliers out of the fit
            for j in range(0, d_in, g):
                s, z, pre[:, j:j + g] = _fit_without(W[:, j:j + g], hinv[j:j + g], tau, cfg)
                scales[:, j // g], zeros[:, j // g] = s, z
        else:
            s, z = fit_grid(W, cfg)  # static groups: fit on the original columns
            scales, zeros = s.to(dtype), z.to(dtype)
        W = W[:, perm]
    if joint:
        out_vals = np.zeros((d_out, d_in), dtype=np.float64 if dtype == torch.float64 else np.float32)
        pre_n = pre.numpy()
    codes = torch.zeros(d_out, d_in, dtype=dtype)
    losses = torch.zeros(d_out, d_in, dtype=dtype)
    clipped = 0  # entries whose nearest code fell outside [0, 2^b - 1]: there the Babai bound fails
    order = perm.tolist()
    codes_n, losses_n, scales_n, zeros_n = codes.numpy(), losses.numpy(), scales.numpy(), zeros.numpy()
    for i1 in range(0, d_in, cfg.block_size):
        i2 = min(i1 + cfg.block_size, d_in)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        # the per-column loop runs on numpy views of the same memory: the same IEEE operations in
        # the same order as the torch expressions (bit-identical), at a fraction of the per-call cost
        W1n, U1n, Err1n = W1.numpy(), U1.numpy(), Err1.numpy()
        for i in range(i2 - i1):
            col = order[i1 + i]
            grp = col // g
            if not static and col % g == 0:
                cur = _group_columns(W, W1, Err1, U, i1, i, min(col + g, d_in))
                if joint:
                    s, z, pre[:, col:col + cur.shape[1]] = _fit_without(cur, hinv[col:col + cur.shape[1]], tau, cfg)
                else:
                    s, z = fit_group_params(cur, cfg.bits, cfg.symmetric, cfg.grid)
                scales[:, grp], zeros[:, grp] = s, z
            s, z = scales_n[:, grp], zeros_n[:, grp]
            w, d = W1n[:, i], U1n[i, i]
            c = np.round(w / s + z)
            clipped += int(np.count_nonzero((c < 0) | (c > maxq)))
            c = np.clip(c, 0, maxq)  # quantize_with_params
            err = (w - (c - z) * s) / d  # (w - dequantize_with_params(c, s, z)) / d
            if joint:  # outliers stay exact in the ortho stream: nothing to compensate
                keep = pre_n[:, col]
                out_vals[keep, col] = err[keep] * d
                err[keep] = 0.0
            codes_n[:, i1 + i] = c
            losses_n[:, i1 + i] = err * err / 2
            W1n[:, i:] -= err[:, None] * U1n[i, i:][None, :]
            Err1n[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    codes, losses = codes[:, inv], losses[:, inv]
    col_losses = losses.sum(0).float()
    pivots = 1.0 / torch.diagonal(U).double() ** 2  # nearest-plane pivot D_k of the k-th processed column
    step_sq = (scales[:, perm // g].double() ** 2).sum(0)  # sum over rows of s^2 at that column
    info = {"method": "gptq", "damp": damp, "act_order": cfg.act_order, "order": cfg.order,
            "dead_columns": int(dead.sum()), "losses": col_losses, "row_losses": losses.sum(1).float(),
            "loss": float(col_losses.sum()), "clipped": clipped,
            "babai_bound": float(0.25 * (pivots * step_sq).sum()),
            "time_s": time.perf_counter() - t0,
            "cholesky_s": t_chol}
    if joint:
        info["outlier_mask"] = pre
        info["outlier_values"] = torch.from_numpy(out_vals).float()
    return QuantResult(codes.clamp(0, maxq).to(torch.uint8), scales.float(), zeros.float(), cfg.bits, g, info)
