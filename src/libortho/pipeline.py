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
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from libortho.config import DecomposeConfig
from libortho.curvature.capture import CalibrationFlow, PhaseTimer, block_plan, forward_precision, stage_hessian
from libortho.models.layers import block_linears, decoder_blocks
from libortho.quant import QuantResult, quantize
from libortho.runtime import OrthoLinear, group_shared_inputs, replace_module
from libortho.runtime.allocator import release_free_memory, retain_freed_memory
from libortho.select.policy import LayerRecord, joint_support, make_ortho, needs_calibration, select_ortho
from libortho.streams import BaseStream, LowRankMemory, SparseOrtho

# the selection policy lives in libortho.select.policy; these names stay importable from here
__all__ = ["DecompositionResult", "LayerRecord", "attach_ortho", "decompose", "joint_support", "make_ortho",
           "needs_calibration", "select_ortho"]


@dataclass(eq=False)
class DecompositionResult:
    """The patched model's per-layer streams plus timing and memory figures."""

    base: dict[str, BaseStream]
    ortho: dict[str, SparseOrtho | LowRankMemory]
    records: dict[str, LayerRecord]
    stats: dict[str, Any]


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
                    timer: PhaseTimer | None = None, kfac: dict[str, Any] | None = None) -> None:
    timer = timer or PhaseTimer()
    quantized = _quantize_shared(names, linears, hessians, cfg, timer)
    for name in names:
        lin, (res, base) = linears[name], quantized[name]
        W = lin.weight.detach().float()
        full = f"{prefix}.{name}"
        result.base[full] = base
        H_sel = None if select_hessians is None else select_hessians[name]
        joint = (res.info["outlier_mask"], res.info["outlier_values"]) if "outlier_mask" in res.info else None
        factors = None if kfac is None else kfac[full]
        if cfg.ortho and cfg.select.scope == "layer":
            with timer("select"):
                result.ortho[full] = make_ortho(W, base, hessians[name] if H_sel is None else H_sel, cfg.select,
                                                joint=joint, kfac=factors)
        if keep:
            result.records[full] = LayerRecord(W.clone(), base, hessians[name],
                                               {k: v for k, v in res.info.items() if k not in ("losses", "row_losses")},
                                               H_sel, factors)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        replace_module(block, name, OrthoLinear(base, None, bias, alpha=0.0))


@torch.no_grad()
def decompose(model: nn.Module, calibration: torch.Tensor | None, config: DecomposeConfig | None = None,
              keep_records: bool = False, true_sequential: bool = True, alpha: float = 1.0,
              progress: bool = True, on_block: Callable[[int], None] | None = None,
              max_blocks: int | None = None, select_calibration: torch.Tensor | None = None,
              kfac: dict[str, Any] | None = None) -> DecompositionResult:
    """Replace every decoder-block linear of ``model`` by an :class:`OrthoLinear` (in place).

    ``calibration``: (n, seq_len) token ids of public text for the base stream's Hessians.
    ``select_calibration``: optional token ids (e.g. the private records) whose Hessians the
    selector scores with instead; they flow through the same already-decomposed blocks, and the
    base stream never sees them.
    ``keep_records`` keeps W, base and H of every layer so :func:`select_ortho` can rebuild
    the ortho stream for other selectors/rho without recalibrating (needed for global scope).
    ``max_blocks`` decomposes only the first blocks (tests, quick looks); the rest stay dense.
    ``kfac``: K-FAC factors by full layer name for ``select.curvature = "kfac"``
    (:func:`libortho.curvature.kfac.fit_kfac` / ``load_kfac``); when omitted they are fitted here on the
    selector's calibration (``select_calibration``, else ``calibration``) over the still-dense model,
    one forward and backward per batch, before any layer is quantized.
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
    if cfg.ortho and cfg.select.curvature == "kfac":
        with timer("kfac"):
            kfac = _kfac_factors(model, kfac, calibration if select_calibration is None else select_calibration, cfg)
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
            _quantize_stage(prefix, linears, list(linears), eye, cfg, block, result, keep, timer=timer, kfac=kfac)
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
                            hess[1] if len(hess) > 1 else None, timer, kfac)
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
                    "true_sequential": true_sequential, "curvature": cfg.select.curvature,
                    "block_plans": sorted(plan_names),
                    "phase_s": timer.exclusive(), "phase_calls": dict(timer.calls)}
    return result


def _kfac_factors(model: nn.Module, given: dict[str, Any] | None, calibration: torch.Tensor | None,
                  cfg: DecomposeConfig) -> dict[str, Any]:
    """The K-FAC factors of every decoder linear to decompose: ``given`` (checked), else fitted on ``calibration``."""
    from libortho.curvature.kfac import fit_kfac
    from libortho.models.layers import block_linear_names

    names = [n for n in block_linear_names(model) if not any(s in n for s in cfg.skip)]
    if given is not None:
        missing = [n for n in names if n not in given]
        if missing:
            raise ValueError(f"the K-FAC factors miss {len(missing)} of the layers to decompose (e.g. {missing[0]})")
        for n in names:
            lin = model.get_submodule(n)
            if given[n].shape != (lin.out_features, lin.in_features):
                raise ValueError(f"K-FAC factors of {n} are for {given[n].shape}, the layer is "
                                 f"{(lin.out_features, lin.in_features)}")
        return given
    if calibration is None:
        raise ValueError("select.curvature='kfac' needs calibration data to fit the K-FAC factors (or kfac=...)")
    layers = {n: model.get_submodule(n) for n in names}
    batches = [calibration[i:i + cfg.batch_size] for i in range(0, calibration.shape[0], cfg.batch_size)]
    return fit_kfac(model, batches, layers, fisher=cfg.select.kfac_fisher)
