"""Geometry-aware, randomised GPTQ: a code width and a rounding noise per region (seed 004).

Seed 004 proposes to quantize by geometry: regions that carry general skill ("functional") at more
bits with GPTQ, regions that carry memorised detail ("sensitive") at fewer bits *and* with random
rounding, so what is left of a record there is noise rather than a rounded copy. A region here is one
quantization group of one row (``group_size`` consecutive inputs), the granularity at which a
mixed-width format can store its width.

:class:`RegionPlan` holds, per (row, group), the code width and the dither in grid steps
(0 = nearest, 1 = stochastic rounding, more = the privacy knob; :mod:`libortho.quant.dither`).
:func:`plan_regions` builds one from two score maps: the ``frac_low`` most sensitive regions go
low-bit with noise, then the ``frac_high`` most functional of the rest go high-bit; every other
region keeps the middle width. With ``bits = (b-1, b, b+1)`` and equal fractions the mean code
width stays ``b``: an equal-bits comparison with uniform INT-b.

:func:`regional_gptq` is GPTQ with those per-region widths and dithers: the grid of each (row, group)
is fit at its own width when the group's first column is reached (on the error-updated columns),
each entry is rounded after adding its region's dither, and every error, noise included, is pushed
onto the later columns as usual, so the functional columns compensate what the sensitive ones lose.
With one width and no noise it is our GPTQ in the natural order (a test). Its output is dense
(dequantized) weights: there is no packed mixed-width kernel, so the format is accounted, not run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from libortho.config import QuantConfig
from libortho.quant.gptq import _group_columns, inverse_cholesky, prepare_hessian
from libortho.quant.grid import check_weight, fit_group_params
from libortho.registry import Registry


@dataclass(frozen=True)
class RegionPlan:
    """Per (row, group) code width ``bits`` (int) and dither ``noise`` (grid steps), both ``(d_out, n_groups)``."""

    bits: torch.Tensor
    noise: torch.Tensor

    def __post_init__(self) -> None:
        if self.bits.shape != self.noise.shape or self.bits.dim() != 2:
            raise ValueError(f"bits {tuple(self.bits.shape)} and noise {tuple(self.noise.shape)} must be one 2-D shape")
        if int(self.bits.min()) < 2 or int(self.bits.max()) > 8:
            raise ValueError(f"code widths must lie in [2, 8], got {int(self.bits.min())}..{int(self.bits.max())}")
        if not bool((self.noise >= 0).all()):  # also refuses NaN
            raise ValueError("noise must be >= 0 grid steps everywhere")

    @classmethod
    def uniform(cls, d_out: int, n_groups: int, bits: int, noise: float = 0.0) -> RegionPlan:
        """Every region at ``bits`` with ``noise``."""
        return cls(torch.full((d_out, n_groups), bits, dtype=torch.int64), torch.full((d_out, n_groups), float(noise)))

    def mean_code_bits(self) -> float:
        """Mean code width per region (every region has the same number of entries except a partial last group)."""
        return float(self.bits.float().mean())

    def width_bits(self) -> float:
        """Bits per region to store which width it uses: ``log2`` of the number of distinct widths (0 if one)."""
        n = int(torch.unique(self.bits).numel())
        return math.log2(n) if n > 1 else 0.0


def plan_regions(functional: torch.Tensor, sensitive: torch.Tensor, bits: tuple[int, int, int], frac_low: float,
                 frac_high: float, noise: float) -> RegionPlan:
    """The ``frac_low`` most ``sensitive`` regions at ``bits[0]`` with ``noise``; then the ``frac_high`` most
    ``functional`` of the others at ``bits[2]``; the rest at ``bits[1]`` without noise (module docstring)."""
    if functional.shape != sensitive.shape:
        raise ValueError(f"score maps differ in shape: {tuple(functional.shape)} vs {tuple(sensitive.shape)}")
    if not (0 <= frac_low < 1 and 0 <= frac_high < 1 and frac_low + frac_high <= 1):
        raise ValueError(f"need fractions in [0, 1) summing to <= 1, got low {frac_low}, high {frac_high}")
    if not bits[0] <= bits[1] <= bits[2]:
        raise ValueError(f"widths must be (low, middle, high) in increasing order, got {bits}")
    n = functional.numel()
    width = torch.full((n,), bits[1], dtype=torch.int64)
    dither = torch.zeros(n)
    n_low, n_high = round(frac_low * n), round(frac_high * n)
    low = torch.argsort(sensitive.flatten().double(), descending=True, stable=True)[:n_low]
    width[low], dither[low] = bits[0], float(noise)
    rest = functional.flatten().double().clone()
    rest[low] = -math.inf
    high = torch.argsort(rest, descending=True, stable=True)[:n_high]
    width[high] = bits[2]
    return RegionPlan(width.view(functional.shape), dither.view(functional.shape))


def region_scores(W: torch.Tensor, h_diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per (row, group): ``sum_j W_rj^2 h_j`` over the group's columns, the diagonal-curvature cost of
    deleting the region (``h``: diag of a layer Hessian, or any per-input weight)."""
    if h_diag.shape != (W.shape[1],):
        raise ValueError(f"h_diag has shape {tuple(h_diag.shape)}, expected ({W.shape[1]},)")
    cost = W.double().square() * h_diag.double()[None, :]
    n_groups = (W.shape[1] + group_size - 1) // group_size
    pad = n_groups * group_size - W.shape[1]
    return torch.nn.functional.pad(cost, (0, pad)).view(W.shape[0], n_groups, group_size).sum(2)


@dataclass(frozen=True)
class LayerView:
    """What the region scores of one linear read: its weights, its weights before fine-tuning (or None) and
    the diagonals of its public (calibration) and private (records) input Hessians."""

    weight: torch.Tensor
    pre_weight: torch.Tensor | None
    h_public: torch.Tensor
    h_private: torch.Tensor


ScoreFn = Callable[[LayerView, int, torch.Generator], torch.Tensor]
SENSITIVITY: Registry[ScoreFn] = Registry("region sensitivity score")


@SENSITIVITY.register("update", needs_pre=True)
def update_score(view: LayerView, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """What fine-tuning wrote, weighted by the private records' curvature: ``(W - W_pre)^2 h_private``."""
    if view.pre_weight is None:
        raise ValueError("the 'update' sensitivity needs the weights before fine-tuning")
    return region_scores(view.weight - view.pre_weight, view.h_private, group_size)


@SENSITIVITY.register("private_curvature")
def private_curvature_score(view: LayerView, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """The region's cost on the private records' inputs: ``W^2 h_private``."""
    return region_scores(view.weight, view.h_private, group_size)


@SENSITIVITY.register("random")
def random_score(view: LayerView, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """The control: regions drawn uniformly at random (same counts, no geometry)."""
    n_groups = (view.weight.shape[1] + group_size - 1) // group_size
    return torch.rand(view.weight.shape[0], n_groups, generator=generator, dtype=torch.float64)


def functional_score(view: LayerView, group_size: int) -> torch.Tensor:
    """The region's cost on public text: ``W^2 h_public`` (diagonal OBS saliency of deleting it)."""
    return region_scores(view.weight, view.h_public, group_size)


def _fit_mixed(cur: torch.Tensor, widths: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of the group ``cur``, each row's grid fit at its own width."""
    s, z = torch.empty(cur.shape[0], dtype=cur.dtype), torch.empty(cur.shape[0], dtype=cur.dtype)
    for b in torch.unique(widths).tolist():
        rows = widths == b
        sb, zb = fit_group_params(cur[rows], int(b), cfg.symmetric, cfg.grid)
        s[rows], z[rows] = sb.to(cur.dtype), zb.to(cur.dtype)
    return s, z


def regional_gptq(W: torch.Tensor, H: torch.Tensor, plan: RegionPlan, cfg: QuantConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """GPTQ of ``W`` in the natural column order with ``plan``'s widths and dithers; returns the dequantized
    weights (W's shape, float32) and ``info`` (loss ``sum_r e_r H e_r^T / 2`` as GPTQ reports it, clipped count,
    mean code width, dithered entries)."""
    check_weight(W)
    d_out, d_in = W.shape
    g = cfg.group_size
    n_groups = (d_in + g - 1) // g
    if plan.bits.shape != (d_out, n_groups):
        raise ValueError(f"plan has shape {tuple(plan.bits.shape)}, expected {(d_out, n_groups)} for W "
                         f"{tuple(W.shape)} at group size {g}")
    if cfg.order != "natural":
        raise ValueError(f"regional GPTQ runs in the natural column order (groups fit as they are reached), "
                         f"got order {cfg.order!r}")
    t0 = time.perf_counter()
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W, H, dead = prepare_hessian(W.detach().to(dtype), H.detach())
    U, damp = inverse_cholesky(H, cfg.damp)
    maxq = (2 ** plan.bits - 1).to(dtype)
    noise = plan.noise.to(dtype)
    out = torch.zeros(d_out, d_in, dtype=dtype)
    loss, clipped = 0.0, 0
    s = z = torch.empty(0)
    for i1 in range(0, d_in, cfg.block_size):
        i2 = min(i1 + cfg.block_size, d_in)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, grp = i1 + i, (i1 + i) // g
            if col % g == 0:
                s, z = _fit_mixed(_group_columns(W, W1, Err1, U, i1, i, min(col + g, d_in)), plan.bits[:, grp], cfg)
            w, d = W1[:, i], U1[i, i]
            x = w / s + z
            if bool((noise[:, grp] > 0).any()):
                x = x + noise[:, grp] * (torch.rand(d_out, generator=generator, dtype=dtype) - 0.5)
            c = torch.round(x)
            clipped += int(((c < 0) | (c > maxq[:, grp])).sum())
            c = torch.minimum(c.clamp_min(0), maxq[:, grp])
            q = (c - z) * s
            out[:, col] = q
            err = (w - q) / d
            loss += float((err * err).sum()) / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    out[:, dead] = 0.0
    groups_noisy = plan.noise > 0
    info = {"method": "regional_gptq", "damp": damp, "loss": loss, "clipped": clipped,
            "mean_code_bits": plan.mean_code_bits(), "width_bits": plan.width_bits(),
            "dithered_regions": int(groups_noisy.sum()), "regions": int(plan.bits.numel()),
            "time_s": time.perf_counter() - t0}
    return out.float(), info
