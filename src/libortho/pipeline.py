"""Offline decomposition of a Hugging Face causal LM into base + ortho streams.

Sequential, block by block, in the order the data flows (the GPTQ scheme): the calibration
activations entering block k come out of the *already decomposed* blocks before it, so memory
stays at one block plus the activations. Inside a block, linears that read the same input
(q/k/v; gate/up) form one stage; with ``true_sequential`` each stage sees the outputs of the
stages before it already quantized.

The base stream is calibrated with the ortho stream *off* (alpha = 0 while propagating), so
the base is exactly plain GPTQ whatever the selector: alpha = 0 is the null model by
construction, and one quantization pass serves every selector/rho (see :func:`select_ortho`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from libortho.config import DecomposeConfig, SelectConfig
from libortho.curvature.capture import CalibrationFlow, PhaseTimer, block_plan, forward_precision, stage_hessian
from libortho.models.layers import block_linears, decoder_blocks
from libortho.quant import QuantResult, quantize
from libortho.runtime import OrthoLinear, group_shared_inputs, replace_module
from libortho.runtime.allocator import release_free_memory, retain_freed_memory
from libortho.select import global_threshold, impact_scores, optimal_values, threshold_mask, topk_mask
from libortho.streams import BaseStream, LowRankMemory, SparseOrtho


@dataclass(eq=False)
class LayerRecord:
    """What re-selecting the ortho stream of one linear needs: W, its base stream and H.

    Linears of one stage (q/k/v; gate/up) read the same input, so their records hold the *same*
    Hessian tensor (clone before saving them side by side, e.g. with safetensors).
    """

    weight: torch.Tensor
    base: BaseStream
    hessian: torch.Tensor
    quant_info: dict[str, Any] = field(default_factory=dict)
    select_hessian: torch.Tensor | None = None  # from the selector's own calibration set, when given

    @property
    def selection_hessian(self) -> torch.Tensor:
        """The curvature the selector scores with: its own calibration's when given, else the base's."""
        return self.hessian if self.select_hessian is None else self.select_hessian


@dataclass(eq=False)
class DecompositionResult:
    """The patched model's per-layer streams plus timing and memory figures."""

    base: dict[str, BaseStream]
    ortho: dict[str, SparseOrtho]
    records: dict[str, LayerRecord]
    stats: dict[str, Any]


def make_ortho(weight: torch.Tensor, base: BaseStream, H: torch.Tensor, cfg: SelectConfig,
               threshold: float | None = None, joint: tuple[torch.Tensor, torch.Tensor] | None = None,
               ) -> SparseOrtho:
    """Score the residual of one layer, pick its support and store the chosen values.

    ``joint``: (mask, in-loop values) of GPTQ's joint selection (``cfg.joint``); the support is
    then that mask trimmed or filled to exactly ``round(rho * numel)`` entries by the selector.
    """
    R = weight.float() - base.dequantize()
    scores = impact_scores(cfg.selector, R, H)
    stored = R  # residual values: on joint entries, their in-loop residuals
    if joint is not None:
        mask = joint_support(joint[0], impact_scores(cfg.selector, joint[1].float(), H), scores, cfg.rho)
        stored = torch.where(mask & joint[0], joint[1].float(), R)
    elif threshold is not None:
        mask = scores >= threshold
    elif cfg.tau is not None:
        mask = threshold_mask(scores, cfg.tau)
    else:
        mask = topk_mask(scores, cfg.rho)
    values = optimal_values(R, H, mask) if cfg.values == "optimal" else stored
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


def select_ortho(records: dict[str, LayerRecord], cfg: SelectConfig) -> dict[str, SparseOrtho]:
    """Ortho streams for every recorded layer (per-layer rho, global rho, or threshold tau)."""
    threshold = None
    if cfg.scope == "global" and cfg.tau is None:
        scores = [impact_scores(cfg.selector, r.weight.float() - r.base.dequantize(), r.selection_hessian)
                  for r in records.values()]
        threshold = global_threshold(scores, cfg.rho)
        del scores
    if cfg.joint and any("outlier_mask" not in r.quant_info for r in records.values()):
        raise ValueError("joint selection needs records of a decomposition that ran it (select.joint=True)")
    joint = {n: (r.quant_info["outlier_mask"], r.quant_info["outlier_values"]) if cfg.joint else None
             for n, r in records.items()}
    return {n: make_ortho(r.weight, r.base, r.selection_hessian, cfg, threshold, joint[n]) for n, r in records.items()}


def attach_ortho(model: nn.Module, ortho: dict[str, SparseOrtho | LowRankMemory], alpha: float = 1.0) -> None:
    """Give the model's OrthoLinear layers their linear-site memory streams and set alpha.

    (Memory of every form, neurons included: :func:`libortho.runtime.attach_memory`.)
    """
    mods = dict(model.named_modules())
    for name, o in ortho.items():
        mod = mods.get(name)
        if not isinstance(mod, OrthoLinear):
            raise KeyError(f"{name!r} is not an OrthoLinear layer of this model")
        mod.set_ortho(o)
        mod.alpha = alpha
    group_shared_inputs(model)


def needs_calibration(cfg: DecomposeConfig) -> bool:
    """Whether the decomposition needs layer Hessians (GPTQ base, or a curvature selector)."""
    return cfg.quant.method != "rtn" or (cfg.ortho and cfg.select.selector != "magnitude")


def _quantize_shared(names: list[str], linears: dict[str, nn.Linear], hessians: dict[str, torch.Tensor],
                    cfg: DecomposeConfig, timer: PhaseTimer) -> dict[str, tuple[QuantResult, BaseStream]]:
    """Quantize the stage's linears; those sharing one Hessian (one input) as one stacked matrix.

    GPTQ treats each output row on its own given H, so the stacked run equals the separate ones
    (tests/test_capture.py checks the codes bit for bit) at one pass of its column loop.
    """
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(id(hessians[n]), []).append(n)
    out: dict[str, tuple[QuantResult, BaseStream]] = {}
    for members in groups.values():
        Ws = [linears[n].weight.detach().float() for n in members]
        with timer("quantize"):
            res = quantize(Ws[0] if len(Ws) == 1 else torch.cat(Ws), cfg.quant, hessians[members[0]],
                           outliers=cfg.select.rho if cfg.ortho and cfg.select.joint else 0.0,
                           parts=[W.shape[0] for W in Ws])
            parts = [res] if len(Ws) == 1 else res.split_rows([W.shape[0] for W in Ws])
            out.update({n: (p, p.to_stream()) for n, p in zip(members, parts, strict=True)})
        if "cholesky_s" in res.info:  # part of "quantize": the inverse Hessian factor
            timer.add("quantize_cholesky", res.info["cholesky_s"])
    return out


def _quantize_stage(prefix: str, linears: dict[str, nn.Linear], names: list[str],
                    hessians: dict[str, torch.Tensor], cfg: DecomposeConfig, block: nn.Module,
                    result: DecompositionResult, keep: bool,
                    select_hessians: dict[str, torch.Tensor] | None = None,
                    timer: PhaseTimer | None = None) -> None:
    timer = timer or PhaseTimer()
    quantized = _quantize_shared(names, linears, hessians, cfg, timer)
    for name in names:
        lin, (res, base) = linears[name], quantized[name]
        W = lin.weight.detach().float()
        full = f"{prefix}.{name}"
        result.base[full] = base
        H_sel = None if select_hessians is None else select_hessians[name]
        joint = (res.info["outlier_mask"], res.info["outlier_values"]) if "outlier_mask" in res.info else None
        if cfg.ortho and cfg.select.scope == "layer":
            with timer("select"):
                result.ortho[full] = make_ortho(W, base, hessians[name] if H_sel is None else H_sel, cfg.select,
                                                joint=joint)
        if keep:
            result.records[full] = LayerRecord(W.clone(), base, hessians[name],
                                               {k: v for k, v in res.info.items() if k not in ("losses", "row_losses")},
                                               H_sel)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        replace_module(block, name, OrthoLinear(base, None, bias, alpha=0.0))


@torch.no_grad()
def decompose(model: nn.Module, calibration: torch.Tensor | None, config: DecomposeConfig | None = None,
              keep_records: bool = False, true_sequential: bool = True, alpha: float = 1.0,
              progress: bool = True, on_block: Callable[[int], None] | None = None,
              max_blocks: int | None = None, select_calibration: torch.Tensor | None = None,
              ) -> DecompositionResult:
    """Replace every decoder-block linear of ``model`` by an :class:`OrthoLinear` (in place).

    ``calibration``: (n, seq_len) token ids of public text for the base stream's Hessians.
    ``select_calibration``: optional token ids (e.g. the private records) whose Hessians the
    selector scores with instead; they flow through the same already-decomposed blocks, and the
    base stream never sees them.
    ``keep_records`` keeps W, base and H of every layer so :func:`select_ortho` can rebuild
    the ortho stream for other selectors/rho without recalibrating (needed for global scope).
    ``max_blocks`` decomposes only the first blocks (tests, quick looks); the rest stay dense.
    """
    cfg = config or DecomposeConfig()
    keep = keep_records or (cfg.ortho and cfg.select.scope == "global")
    model.eval()
    t0, rss0 = time.perf_counter(), psutil.Process().memory_info().rss
    peak = rss0
    result = DecompositionResult({}, {}, {}, {})
    calibrate = needs_calibration(cfg)
    if calibrate and calibration is None:
        raise ValueError("this configuration needs calibration data (GPTQ or a curvature selector)")
    if select_calibration is not None and not (cfg.ortho and calibrate):
        raise ValueError("select_calibration needs an ortho stream and a calibrated (GPTQ or curvature) run")
    release_free_memory()  # what loading and tokenizing freed goes back first (runtime/allocator.py)
    retain_freed_memory()  # then activations are reused, not page-faulted in per batch
    timer = PhaseTimer()
    calib_dtype = torch.bfloat16 if cfg.calib_dtype == "bf16" else torch.float32
    with timer("capture"), forward_precision(calib_dtype):
        flow = CalibrationFlow.capture(model, calibration, cfg.batch_size) if calibrate else None
        sel_flow = (None if select_calibration is None
                    else CalibrationFlow.capture(model, select_calibration, cfg.batch_size))
    plan_names: set[str] = set()
    blocks = decoder_blocks(model)[:max_blocks]
    prefixes = {id(m): n for n, m in model.named_modules()}
    for k, block in enumerate(tqdm(blocks, desc="decompose", disable=not progress, unit="block")):
        prefix = prefixes[id(block)]
        linears = {n: m for n, m in block_linears(block).items()
                   if not any(s in f"{prefix}.{n}" for s in cfg.skip)}
        if flow is None:  # RTN + magnitude: no curvature and no forward passes needed
            eye = {n: torch.eye(m.in_features) for n, m in linears.items()}
            _quantize_stage(prefix, linears, list(linears), eye, cfg, block, result, keep, timer=timer)
            continue
        with timer("stage_discovery"):
            plan = block_plan(block, linears, flow, calib_dtype)
        walks = [plan.walk(f) for f in (flow, sel_flow) if f is not None]
        plan_names.add(plan.name)
        groups = plan.stages if true_sequential else [[n for s in plan.stages for n in s]]
        for stage in groups:
            # all-at-once (not true_sequential): every stage's input from the unquantized block
            idx = [plan.stages.index(s) for s in plan.stages if s[0] in stage]
            hess: list[dict[str, torch.Tensor]] = []
            for w, phase in zip(walks, ("hessian_accumulate", "select_hessian_accumulate"), strict=False):
                hs: dict[str, torch.Tensor] = {}
                for i in idx:
                    H = stage_hessian(w.stage_inputs(i), linears[plan.stages[i][0]].in_features, timer, phase,
                                      calib_dtype)
                    hs.update({n: H for n in plan.stages[i]})
                hess.append(hs)
            _quantize_stage(prefix, linears, stage, hess[0], cfg, block, result, keep,
                            hess[1] if len(hess) > 1 else None, timer)
            peak = max(peak, psutil.Process().memory_info().rss)
        for w in walks:
            with timer("advance_forward"), forward_precision(calib_dtype):
                w.finish()
        with timer("trim"):  # the block's freed activations and weights go back to the system: the heap
            release_free_memory()  # otherwise grows by fragmentation, block after block (+270 MB over 30)
        if on_block is not None:
            on_block(k)
    if cfg.ortho:
        if cfg.select.scope == "global":
            with timer("select"):
                result.ortho = select_ortho(result.records, cfg.select)
        attach_ortho(model, result.ortho, alpha)
    if not keep_records:
        result.records = {}
    result.stats = {"wall_s": time.perf_counter() - t0, "peak_rss_mb": peak / 2**20,
                    "rss_growth_mb": (peak - rss0) / 2**20, "blocks": len(blocks), "layers": len(result.base),
                    "calib_tokens": 0 if calibration is None else int(calibration.numel()),
                    "select_calib_tokens": 0 if select_calibration is None else int(select_calibration.numel()),
                    "true_sequential": true_sequential, "block_plans": sorted(plan_names),
                    "phase_s": timer.exclusive(), "phase_calls": dict(timer.calls)}
    return result
