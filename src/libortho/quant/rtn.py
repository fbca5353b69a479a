"""Round-to-nearest quantization on a group-wise grid (no calibration data)."""

from __future__ import annotations

import time

import torch

from libortho.config import QuantConfig
from libortho.quant.grid import QuantResult, check_weight, fit_grid, quantize_with_params
from libortho.streams.base import expand_groups


def rtn_quantize(W: torch.Tensor, cfg: QuantConfig, H: torch.Tensor | None = None) -> QuantResult:
    """Quantize every entry to its nearest grid point; ``H`` is accepted and ignored."""
    check_weight(W)
    t0 = time.perf_counter()
    Wf = W.detach().float()
    scales, zeros = fit_grid(Wf, cfg)
    d_in = Wf.shape[1]
    codes = quantize_with_params(Wf, expand_groups(scales, d_in, cfg.group_size),
                                 expand_groups(zeros, d_in, cfg.group_size), cfg.bits)
    return QuantResult(codes.to(torch.uint8), scales, zeros, cfg.bits, cfg.group_size,
                       {"method": "rtn", "time_s": time.perf_counter() - t0})
