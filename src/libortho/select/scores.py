"""Impact scores of residual entries ``R = W - Q``, one registry for all selectors.

Every score is a pure function ``(R, curvature) -> scores`` of the same shape as R; larger means
the entry matters more to the layer's output and belongs in the ortho stream. The curvature is a
:class:`~libortho.curvature.operator.Curvature` (GPTQ's layer Hessian, K-FAC, ...) or a bare layer
Hessian tensor; selectors read only its diagonal and its inverse's diagonal, so any form plugs in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from libortho.curvature.damping import damped
from libortho.curvature.operator import inverse_hessian_diag  # noqa: F401  (re-exported: libortho.select)

ScoreFn = Callable[[torch.Tensor, Any], torch.Tensor]
SELECTORS: dict[str, ScoreFn] = {}


def register_selector(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding a score function to :data:`SELECTORS` under ``name``."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        if name in SELECTORS:
            raise ValueError(f"selector {name!r} registered twice")
        SELECTORS[name] = fn
        return fn

    return wrap


def damped_hessian(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """H (fp64) with dead columns set to 1 and ``damp * mean(diag H)`` added: the one rule of
    :func:`libortho.curvature.damping.damped`."""
    return damped(H, damp, torch.float64)


def _need_h(name: str, H: Any, R: torch.Tensor) -> Any:
    from libortho.curvature.operator import as_curvature

    C = as_curvature(H)
    if C is None:
        raise ValueError(f"selector {name!r} needs the layer Hessian H (or another curvature)")
    C.check(tuple(R.shape))
    return C


@register_selector("magnitude")
def magnitude_score(R: torch.Tensor, H: Any = None) -> torch.Tensor:
    """``R_ij^2``: the residual's own size, blind to curvature."""
    return R.float().square()


@register_selector("obs")
def obs_saliency(R: torch.Tensor, H: Any = None) -> torch.Tensor:
    """``R_ij^2 / [H^-1]_jj``: optimal-brain-surgeon saliency (seed 002 eq. 8)."""
    C = _need_h("obs", H, R)
    return R.float().square() / C.inverse_diagonal().clamp_min(1e-30)


@register_selector("diag")
def diag_score(R: torch.Tensor, H: Any = None) -> torch.Tensor:
    """``R_ij^2 * H_jj``: the literal diagonal-Hessian approximation (seed 001 §3.1)."""
    C = _need_h("diag", H, R)
    return R.float().square() * C.diagonal()


def impact_scores(name: str, R: torch.Tensor, H: Any) -> torch.Tensor:
    """Dispatch to the registered selector ``name``."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; available: {sorted(SELECTORS)}")
    scores = SELECTORS[name](R, H)
    if not torch.isfinite(scores).all():
        raise ValueError(f"selector {name!r} produced non-finite scores (NaN/inf in R or H?)")
    return scores
