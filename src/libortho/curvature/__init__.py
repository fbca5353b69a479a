"""Curvature statistics of linear layers (GPTQ Hessian; K-FAC factors later)."""

from libortho.curvature.hessian import HessianAccumulator, accumulate_hessian

__all__ = ["HessianAccumulator", "accumulate_hessian"]
