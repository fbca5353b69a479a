"""Curvature statistics of linear layers: the GPTQ Hessian and K-FAC factors (one fp64 reduction)."""

from libortho.curvature.hessian import HessianAccumulator, MomentSum, accumulate_hessian
from libortho.curvature.kfac import (
    FISHER_TYPES,
    KFACAccumulator,
    KFACFactors,
    causal_lm_outputs,
    fisher_error,
    fit_kfac,
    load_kfac,
    per_example_fisher,
    save_kfac,
)

__all__ = [
    "FISHER_TYPES", "HessianAccumulator", "KFACAccumulator", "KFACFactors", "MomentSum", "accumulate_hessian",
    "causal_lm_outputs", "fisher_error", "fit_kfac", "load_kfac", "per_example_fisher", "save_kfac",
]
