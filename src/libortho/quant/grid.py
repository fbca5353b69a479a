"""Group-wise integer grids: scale/zero fitting (min-max, MSE clipping, HQQ), codes, QuantResult.

A group is ``group_size`` consecutive columns (along ``in_features``) of one row; the last group
may be partial. Dequantized value: ``(code - zero) * scale``.

Every grid keeps two invariants, so that what the quantizer computes with is exactly what the
stream stores *and* what the CPU INT4 kernel (bf16 scale and offset) computes with:

* scales are bf16-representable numbers (8 significant bits) no smaller than 2^-14, the smallest
  normal fp16, so fp16 stores them exactly; min-max scales are rounded *up* to that grid, so the
  group's range stays covered and the error of an in-range entry is at most half a step;
* zero points lie in ``[0, 2^b - 1]`` (min-max ranges always include 0, as in GPTQ; HQQ's
  fractional zero is clamped to that interval), so the kernel's offset ``(8 - zero) * scale``
  is at most 8 steps and its bf16 rounding stays below 1/32 of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from libortho.config import QuantConfig
from libortho.streams.base import BaseStream, dequantize_codes, num_groups

MIN_SCALE = 2.0**-14  # smallest normal fp16: a subnormal scale has too few bits to cover its range
MAX_SCALE = 65280.0  # largest bf16 value that fp16 can hold


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value, keep the original dtype."""
    return t.to(torch.float16).to(t.dtype)


def grid_scale(raw: torch.Tensor) -> torch.Tensor:
    """The smallest bf16-representable scale >= ``max(raw, MIN_SCALE)`` (exact in fp16 and bf16).

    Rounding up keeps a min-max range covered; the CPU INT4 kernel then uses the scale unrounded.
    """
    x = raw.float().clamp_min(MIN_SCALE)
    if bool((x > MAX_SCALE).any()):
        raise ValueError(f"weights too large to quantize: a grid step would exceed {MAX_SCALE:g}, "
                         "the largest scale both fp16 and bf16 hold")
    b = x.to(torch.bfloat16)
    up = (b.view(torch.int16) + 1).view(torch.bfloat16)  # next bf16 above a positive value
    return torch.where(b.float() < x, up, b).float().to(raw.dtype)


def quantize_with_params(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / scale + zero), 0, 2^b - 1)`` (a float tensor of integers)."""
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


def dequantize_with_params(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale``."""
    return (codes - zero) * scale


def _minmax(w: torch.Tensor, bits: int, symmetric: bool, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(1) * shrink
        scale = grid_scale(2 * amax / maxq)
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    # the range always includes 0, so the zero point is an in-range code (GPTQ's convention)
    lo = torch.clamp(w.amin(1) * shrink, max=0.0)
    hi = torch.clamp(w.amax(1) * shrink, min=0.0)
    scale = grid_scale((hi - lo) / maxq)
    return scale, torch.clamp(torch.round(-lo / scale), 0, maxq) + 0.0  # + 0.0 turns -0 into 0


def _sq_err(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    s, z = scale[:, None], zero[:, None]
    return (dequantize_with_params(quantize_with_params(w, s, z, bits), s, z) - w).square().sum(1)


def _mse_search(w: torch.Tensor, bits: int, symmetric: bool, steps: int = 80,
                min_shrink: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the clipping factor (1 down to ``min_shrink``) with least squared error."""
    best_s, best_z = _minmax(w, bits, symmetric)
    best_e = _sq_err(w, best_s, best_z, bits)
    for shrink in torch.linspace(1.0, min_shrink, steps)[1:].tolist():
        s, z = _minmax(w, bits, symmetric, shrink)
        e = _sq_err(w, s, z, bits)
        better = e < best_e
        best_s, best_z, best_e = (torch.where(better, s, best_s), torch.where(better, z, best_z),
                                  torch.where(better, e, best_e))
    return best_s, best_z


def _hqq_zero(w: torch.Tensor, bits: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
              kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ-style half-quadratic refinement of a float zero point (scale fixed from min-max).

    Alternates a generalised soft-threshold of the error (the lp, p < 1, proximal step) with the
    closed-form zero update, clamped to ``[0, 2^b - 1]`` (the zero stays fractional); keeps, per row,
    the iterate with the least squared error.
    """
    scale, zero = _minmax(w, bits, symmetric=False)
    s = scale[:, None]
    z = zero[:, None].clone()
    best_z, best_e = zero.clone(), _sq_err(w, scale, zero, bits)
    for _ in range(iters):
        q = quantize_with_params(w, s, z, bits)
        err = w - dequantize_with_params(q, s, z)
        shrunk = torch.sign(err) * torch.relu(err.abs() - err.abs().clamp_min(1e-12).pow(p - 1) / beta)
        z = _fp16((q - (w - shrunk) / s).mean(1, keepdim=True).clamp(0, 2**bits - 1))
        e = _sq_err(w, scale, z[:, 0], bits)
        better = e < best_e
        best_z, best_e = torch.where(better, z[:, 0], best_z), torch.where(better, e, best_e)
        beta *= kappa
    return scale, best_z


def fit_group_params(w: torch.Tensor, bits: int, symmetric: bool = False, method: str = "minmax",
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (each ``(rows,)``) for one column group ``w (rows, cols)``.

    Scales are bf16- and fp16-exact and at least :data:`MIN_SCALE`; zeros are fp16-exact, in ``[0, 2^b - 1]``.
    """
    if method == "minmax":
        return _minmax(w, bits, symmetric)
    if method == "mse":
        return _mse_search(w, bits, symmetric)
    if method == "hqq":
        if symmetric:
            raise ValueError("the hqq grid optimises a free zero point: use symmetric=False")
        return _hqq_zero(w, bits)
    raise ValueError(f"unknown grid method {method!r} (minmax, mse, hqq)")


def fit_grid(W: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros ``(d_out, n_groups)`` for every column group of ``W``."""
    d_in, g = W.shape[1], cfg.group_size
    pairs = [fit_group_params(W[:, j:j + g], cfg.bits, cfg.symmetric, cfg.grid) for j in range(0, d_in, g)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


# per-entry info tensors (shape of W) that follow the rows when a stacked result is split
ROW_TENSORS = ("outlier_mask", "outlier_values")


@dataclass(frozen=True, eq=False)
class QuantResult:
    """Integer codes + per-group scale/zero of one matrix, and what the quantizer measured."""

    codes: torch.Tensor  # uint8 (d_out, d_in)
    scales: torch.Tensor  # fp32 (d_out, n_groups), bf16- and fp16-exact, >= MIN_SCALE
    zeros: torch.Tensor  # fp32 (d_out, n_groups), fp16-exact, in code units, in [0, 2^b - 1]
    bits: int
    group_size: int
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d_out, d_in = self.codes.shape
        ng = num_groups(d_in, self.group_size)
        if self.scales.shape != (d_out, ng) or self.zeros.shape != (d_out, ng):
            raise ValueError(f"scales/zeros must be {(d_out, ng)}")

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 ``Q`` ``(d_out, d_in)`` — identical to ``to_stream().dequantize()``."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.group_size)

    def split_rows(self, sizes: list[int]) -> list[QuantResult]:
        """Cut a result over stacked matrices back into one per matrix (rows in ``sizes``).

        Row-wise quantizers (RTN; GPTQ given one shared Hessian) treat every output row on its own,
        so quantizing linears that read the same input as one stacked matrix and splitting equals
        quantizing them one by one, at one pass of the column loop. Per-part ``info``: ``loss`` and
        ``row_losses`` of the part's rows; the rest (time, damping) is the joint run's, marked by
        ``joint_rows``; per-column ``losses`` are not split (dropped); per-entry tensors (the joint
        outlier mask and values) are cut like the codes.
        """
        if sum(sizes) != self.codes.shape[0] or any(n <= 0 for n in sizes):
            raise ValueError(f"row sizes {sizes} do not partition {self.codes.shape[0]} rows")
        parts, start = [], 0
        rows = self.info.get("row_losses")
        for n in sizes:
            sl = slice(start, start + n)
            info = {k: v for k, v in self.info.items() if k not in ("losses", "row_losses", "loss")}
            info["joint_rows"] = self.codes.shape[0]
            for k in ROW_TENSORS:
                if k in self.info:
                    info[k] = self.info[k][sl]
            if rows is not None:
                info["row_losses"] = rows[sl]
                info["loss"] = float(rows[sl].sum())
            parts.append(QuantResult(self.codes[sl], self.scales[sl], self.zeros[sl], self.bits, self.group_size, info))
            start += n
        return parts

    def to_stream(self) -> BaseStream:
        """Pack into the storage format of the base stream."""
        return BaseStream.from_codes(self.codes, self.scales, self.zeros, self.bits, self.group_size)


def check_weight(W: torch.Tensor, name: str = "weight") -> None:
    """Refuse non-2-D or non-finite weights with a message naming the problem."""
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} contains NaN or inf")
