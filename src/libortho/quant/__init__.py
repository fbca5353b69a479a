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


def quantize(W: torch.Tensor, cfg: QuantConfig, H: torch.Tensor | None = None, outliers: float = 0.0,
             parts: list[int] | None = None) -> QuantResult:
    """Quantize ``W`` with the method ``cfg.method`` names (GPTQ needs the layer Hessian).

    ``outliers`` > 0: GPTQ also selects that fraction of entries jointly, per part of stacked rows
    (:func:`gptq_quantize`).
    """
    if cfg.method not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {cfg.method!r}; available: {sorted(QUANTIZERS)}")
    if cfg.method == "gptq" and H is None:
        raise ValueError("GPTQ needs the layer Hessian H (pass calibration data)")
    if outliers:
        if cfg.method != "gptq":
            raise ValueError(f"joint outlier selection runs inside GPTQ, not {cfg.method!r}")
        return gptq_quantize(W, cfg, H, outliers=outliers, parts=parts)
    return QUANTIZERS[cfg.method](W, cfg, H)


__all__ = ["QUANTIZERS", "QuantResult", "fit_grid", "fit_group_params", "gptq_quantize", "quantize",
           "rtn_quantize"]
