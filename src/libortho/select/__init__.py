"""Which residual entries go to the ortho stream: score registry and support selection."""

from libortho.select.scores import (
    SELECTORS,
    diag_score,
    impact_scores,
    inverse_hessian_diag,
    magnitude_score,
    obs_saliency,
    register_selector,
)
from libortho.select.support import global_threshold, optimal_values, threshold_mask, topk_mask

__all__ = [
    "SELECTORS", "diag_score", "global_threshold", "impact_scores", "inverse_hessian_diag",
    "magnitude_score", "obs_saliency", "optimal_values", "register_selector", "threshold_mask",
    "topk_mask",
]
