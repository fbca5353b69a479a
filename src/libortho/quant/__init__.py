"""Quantizers of the dense base stream: one registry, one call signature ``(W, cfg, H) -> QuantResult``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from libortho.config import QuantConfig
from libortho.quant.gptq import gptq_quantize
from libortho.quant.grid import QuantResult, fit_grid, fit_group_params
from libortho.quant.rtn import rtn_quantize

Quantizer = Callable[[torch.Tensor, QuantConfig, torch.Tensor | None], QuantResult]
QUANTIZERS: dict[str, Quantizer] = {"rtn": rtn_quantize, "gptq": gptq_quantize}


def quantize(W: torch.Tensor, cfg: QuantConfig, H: torch.Tensor | None = None) -> QuantResult:
    """Quantize ``W`` with the method ``cfg.method`` names (GPTQ needs the layer Hessian)."""
    if cfg.method not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {cfg.method!r}; available: {sorted(QUANTIZERS)}")
    if cfg.method == "gptq" and H is None:
        raise ValueError("GPTQ needs the layer Hessian H (pass calibration data)")
    return QUANTIZERS[cfg.method](W, cfg, H)


__all__ = ["QUANTIZERS", "QuantResult", "fit_grid", "fit_group_params", "gptq_quantize", "quantize",
           "rtn_quantize"]
