"""Selection policy: which memory stream one layer gets, from its residual and its curvature.

The decomposition (:mod:`libortho.pipeline`) quantizes each linear and hands this module the
layer's weight, base stream and curvature; everything about *choosing* the ortho stream lives here:

* the curvature the selector scores with (:func:`layer_curvature`): GPTQ's layer Hessian (the
  base's calibration, or the selector's own calibration set when given), or K-FAC factors
  (``SelectConfig.curvature = "kfac"``);
* a **sparse** stream (selectors of :data:`libortho.select.SELECTORS`: magnitude, obs, diag): the
  top ``rho`` entries by score, or every score above ``tau``, or a global threshold over all layers,
  or (``joint``) GPTQ's in-loop support trimmed/filled to exactly ``rho``;
* a **factored** stream (builders of :data:`libortho.select.kfac.KFAC_MEMORY`, K-FAC curvature only):
  a low-rank ``B A`` given exactly the bits the sparse stream of the same ``rho`` would take in that
  layer (obs under the same curvature: the comparison of issue 10 at equal bits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from libortho.config import DecomposeConfig, SelectConfig
from libortho.curvature.kfac import KFACFactors
from libortho.curvature.operator import Curvature, KFACCurvature, LayerHessian
from libortho.select.scores import impact_scores
from libortho.select.support import global_threshold, optimal_values, threshold_mask, topk_mask
from libortho.streams import BaseStream, LowRankMemory, SparseOrtho


@dataclass(eq=False)
class LayerRecord:
    """What re-selecting the ortho stream of one linear needs: W, its base stream and its curvature.

    Linears of one stage (q/k/v; gate/up) read the same input, so their records hold the *same*
    Hessian tensor (clone before saving them side by side, e.g. with safetensors).
    """

    weight: torch.Tensor
    base: BaseStream
    hessian: torch.Tensor
    quant_info: dict[str, Any] = field(default_factory=dict)
    select_hessian: torch.Tensor | None = None  # from the selector's own calibration set, when given
    kfac: KFACFactors | None = None  # K-FAC factors of this layer, when the selector uses them

    @property
    def selection_hessian(self) -> torch.Tensor:
        """The layer Hessian the selector scores with: its own calibration's when given, else the base's."""
        return self.hessian if self.select_hessian is None else self.select_hessian


def layer_curvature(H: torch.Tensor | None, kfac: KFACFactors | None, cfg: SelectConfig) -> Curvature | None:
    """The curvature ``cfg`` scores with: K-FAC factors (``curvature="kfac"``) or the layer Hessian ``H``."""
    if cfg.curvature == "kfac":
        if kfac is None:
            raise ValueError("select.curvature='kfac' but no K-FAC factors were given for this layer")
        return KFACCurvature(kfac, cfg.kfac_damp)
    return None if H is None else LayerHessian(H)


def is_factored(selector: str) -> bool:
    """Whether ``selector`` builds a factored (low-rank) stream rather than a sparse one."""
    from libortho.select.kfac import KFAC_MEMORY

    return selector in KFAC_MEMORY


def sparse_budget_bits(R: torch.Tensor, curvature: Curvature | None, cfg: SelectConfig) -> int:
    """Bits the sparse stream of ``cfg.rho`` takes in this layer (obs under the same curvature, as stored)."""
    mask = topk_mask(impact_scores("obs" if curvature is not None else "magnitude", R, curvature), cfg.rho)
    return 8 * SparseOrtho.from_mask(R, mask, cfg.dtype).nbytes


def factored_memory(R: torch.Tensor, kfac: KFACFactors, cfg: SelectConfig) -> LowRankMemory | SparseOrtho:
    """A K-FAC builder's low-rank stream at the bits of the sparse stream of ``cfg.rho`` (empty if none fit)."""
    from libortho.select.kfac import KFAC_MEMORY, rank_for_bits

    C = KFACCurvature(kfac, cfg.kfac_damp)
    value_bits = 32 if cfg.dtype == "fp32" else 16
    r = rank_for_bits(sparse_budget_bits(R, C, cfg), *R.shape, value_bits=value_bits)
    if r == 0:
        return SparseOrtho.empty(tuple(R.shape), cfg.dtype)
    B, A = KFAC_MEMORY[cfg.selector](R, kfac, r, cfg.kfac_damp)
    return LowRankMemory.from_factors(B, A, dtype=cfg.dtype)


def make_ortho(weight: torch.Tensor, base: BaseStream, H: torch.Tensor | None, cfg: SelectConfig,
               threshold: float | None = None, joint: tuple[torch.Tensor, torch.Tensor] | None = None,
               kfac: KFACFactors | None = None) -> SparseOrtho | LowRankMemory:
    """Score the residual of one layer, pick its support and store the chosen values.

    ``H``: the layer Hessian (ignored under K-FAC curvature, where ``kfac`` holds the factors).
    ``joint``: (mask, in-loop values) of GPTQ's joint selection (``cfg.joint``); the support is
    then that mask trimmed or filled to exactly ``round(rho * numel)`` entries by the selector.
    """
    R = weight.float() - base.dequantize()
    curv = layer_curvature(H, kfac, cfg)
    if is_factored(cfg.selector):
        assert kfac is not None  # layer_curvature refused it otherwise (the config needs curvature="kfac")
        return factored_memory(R, kfac, cfg)
    scores = impact_scores(cfg.selector, R, curv)
    stored = R  # residual values: on joint entries, their in-loop residuals
    if joint is not None:
        mask = joint_support(joint[0], impact_scores(cfg.selector, joint[1].float(), curv), scores, cfg.rho)
        stored = torch.where(mask & joint[0], joint[1].float(), R)
    elif threshold is not None:
        mask = scores >= threshold
    elif cfg.tau is not None:
        mask = threshold_mask(scores, cfg.tau)
    else:
        mask = topk_mask(scores, cfg.rho)
    if cfg.values == "optimal":
        if H is None:
            raise ValueError("values='optimal' re-solves against the layer Hessian: none was captured")
        values = optimal_values(R, H, mask)
    else:
        values = stored
    return SparseOrtho.from_mask(values, mask, cfg.dtype)


def joint_support(joint: torch.Tensor, joint_scores: torch.Tensor, scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Exactly ``round(rho * numel)`` entries: the joint mask's best (by ``joint_scores``) when it
    has too many, else all of it plus the best others by ``scores`` (the final residual's)."""
    k = int(round(rho * scores.numel()))
    n = int(joint.sum())
    if n >= k:
        return topk_mask(torch.where(joint, joint_scores.float(), -1.0), k / scores.numel()) & joint
    extra = topk_mask(torch.where(joint, -1.0, scores.float()), (k - n) / scores.numel())
    return joint | extra


def select_ortho(records: dict[str, LayerRecord], cfg: SelectConfig) -> dict[str, SparseOrtho | LowRankMemory]:
    """Ortho streams for every recorded layer (per-layer rho, global rho, or threshold tau)."""
    threshold = None
    if cfg.scope == "global" and cfg.tau is None:
        scores = [impact_scores(cfg.selector, r.weight.float() - r.base.dequantize(),
                                layer_curvature(r.selection_hessian, r.kfac, cfg))
                  for r in records.values()]
        threshold = global_threshold(scores, cfg.rho)
        del scores
    if cfg.joint and any("outlier_mask" not in r.quant_info for r in records.values()):
        raise ValueError("joint selection needs records of a decomposition that ran it (select.joint=True)")
    joint = {n: (r.quant_info["outlier_mask"], r.quant_info["outlier_values"]) if cfg.joint else None
             for n, r in records.items()}
    return {n: make_ortho(r.weight, r.base, r.selection_hessian, cfg, threshold, joint[n], r.kfac)
            for n, r in records.items()}


def needs_calibration(cfg: DecomposeConfig) -> bool:
    """Whether the decomposition needs calibration data (GPTQ base, or a curvature selector)."""
    return cfg.quant.method != "rtn" or (cfg.ortho and (cfg.select.selector != "magnitude"
                                                        or cfg.select.curvature == "kfac"))
