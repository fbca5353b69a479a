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

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from libortho.config import DecomposeConfig, SelectConfig
from libortho.curvature import HessianAccumulator
from libortho.models.layers import block_linears, decoder_blocks
from libortho.quant import quantize
from libortho.runtime import OrthoLinear, replace_module
from libortho.select import global_threshold, impact_scores, optimal_values, threshold_mask, topk_mask
from libortho.streams import BaseStream, LowRankMemory, SparseOrtho


class PhaseTimer:
    """Wall seconds spent in each named phase of a decomposition (where the time goes).

    Phases nest: time inside a hook (Hessian accumulation) is also inside the enclosing forward, so
    :meth:`exclusive` reports forwards without it. One instance per run; cheap (two clock reads).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):  # noqa: ANN204 - a context manager
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t
            self.calls[phase] = self.calls.get(phase, 0) + 1

    def add(self, phase: str, seconds: float) -> None:
        """Record time measured elsewhere (e.g. GPTQ's own Cholesky timing, a sub-phase of "quantize")."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def exclusive(self) -> dict[str, float]:
        """Seconds per phase, the Hessian accumulation taken out of the stage forwards that ran it."""
        out = dict(self.seconds)
        if "stage_forward" in out:
            out["stage_forward"] -= out.get("hessian_accumulate", 0.0) + out.get("select_hessian_accumulate", 0.0)
        return out


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


@dataclass(eq=False)
class LayerRecord:
    """What re-selecting the ortho stream of one linear needs: W, its base stream and H."""

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


def _batches(calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calibration must be a (n, seq_len) integer tensor, got "
                         f"{tuple(calib.shape)} {calib.dtype}")
    if calib.shape[0] == 0:
        raise ValueError("calibration set is empty")
    return [calib[i:i + batch_size] for i in range(0, calib.shape[0], batch_size)]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int,
                         ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to decoder block 0; return its hidden-state inputs and kwargs per batch."""
    first = decoder_blocks(model)[0]
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(hs.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        kw["use_cache"] = False
        kwargs_list.append(kw)
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in _batches(calib, batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs_list


def _block_out(block: nn.Module, hs: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    out = block(hs, **kw)
    return out[0] if isinstance(out, tuple) else out


@dataclass(eq=False)
class _Flow:
    """Calibration activations entering the current decoder block (per batch), with the block kwargs."""

    hidden: list[torch.Tensor]
    kws: list[dict[str, Any]]

    @classmethod
    def capture(cls, model: nn.Module, tokens: torch.Tensor, batch_size: int) -> _Flow:
        return cls(*capture_block_inputs(model, tokens, batch_size))

    def hessians(self, block: nn.Module, linears: dict[str, nn.Linear], names: list[str],
                 timer: PhaseTimer | None = None, phase: str = "hessian_accumulate") -> dict[str, torch.Tensor]:
        return _accumulate(block, linears, names, self.hidden, self.kws, timer, phase)

    @torch.no_grad()
    def advance(self, block: nn.Module, timer: PhaseTimer | None = None) -> None:
        """Run the (already decomposed) block: its outputs are the next block's inputs."""
        with (timer or PhaseTimer())("advance_forward"):
            self.hidden = [_block_out(block, hs, kw) for hs, kw in zip(self.hidden, self.kws, strict=True)]


@torch.no_grad()
def _linear_stages(block: nn.Module, linears: dict[str, nn.Linear], hs: torch.Tensor,
                   kw: dict[str, Any]) -> list[list[str]]:
    """Group the block's linears into stages of shared input, in call order."""
    order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their addresses unique
    handles = [lin.register_forward_pre_hook(
        lambda _m, args, n=name: order.append((n, args[0]))) for name, lin in linears.items()]
    try:
        _block_out(block, hs[:1], kw_slice(kw, 1))
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    seen: dict[int, int] = {}
    for name, x in order:
        if any(name in s for s in stages):
            continue
        key = id(x)
        if key in seen:
            stages[seen[key]].append(name)
        else:
            seen[key] = len(stages)
            stages.append([name])
    missing = [n for n in linears if not any(n in s for s in stages)]
    return stages + ([missing] if missing else [])


def kw_slice(kw: dict[str, Any], n: int) -> dict[str, Any]:
    """Slice batch-dimensioned tensors (and tuples of them) in block kwargs to the first n rows."""
    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > n:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kw.items()}


@torch.no_grad()
def _accumulate(block: nn.Module, linears: dict[str, nn.Linear], names: list[str],
                hidden: list[torch.Tensor], kws: list[dict[str, Any]], timer: PhaseTimer | None = None,
                phase: str = "hessian_accumulate") -> dict[str, torch.Tensor]:
    """Hessians of the named linears' inputs over all calibration batches (shared when inputs are)."""
    timer = timer or PhaseTimer()
    accs: dict[str, HessianAccumulator] = {}
    handles = []

    def add(name: str, x: torch.Tensor) -> None:
        with timer(phase):
            accs[name].add_batch(x.detach().float())

    for name in names:
        lin = linears[name]
        accs[name] = HessianAccumulator(lin.in_features)
        handles.append(lin.register_forward_pre_hook(lambda _m, args, n=name: add(n, args[0])))
    try:
        for hs, kw in zip(hidden, kws, strict=True):
            with timer("stage_forward"):
                _block_out(block, hs, kw)
    finally:
        for h in handles:
            h.remove()
    return {n: a.H for n, a in accs.items()}


def make_ortho(weight: torch.Tensor, base: BaseStream, H: torch.Tensor, cfg: SelectConfig,
               threshold: float | None = None) -> SparseOrtho:
    """Score the residual of one layer, pick its support and store the chosen values."""
    R = weight.float() - base.dequantize()
    scores = impact_scores(cfg.selector, R, H)
    if threshold is not None:
        mask = scores >= threshold
    elif cfg.tau is not None:
        mask = threshold_mask(scores, cfg.tau)
    else:
        mask = topk_mask(scores, cfg.rho)
    values = optimal_values(R, H, mask) if cfg.values == "optimal" else R
    return SparseOrtho.from_mask(values, mask, cfg.dtype)


def select_ortho(records: dict[str, LayerRecord], cfg: SelectConfig) -> dict[str, SparseOrtho]:
    """Ortho streams for every recorded layer (per-layer rho, global rho, or threshold tau)."""
    threshold = None
    if cfg.scope == "global" and cfg.tau is None:
        scores = [impact_scores(cfg.selector, r.weight.float() - r.base.dequantize(), r.selection_hessian)
                  for r in records.values()]
        threshold = global_threshold(scores, cfg.rho)
        del scores
    return {n: make_ortho(r.weight, r.base, r.selection_hessian, cfg, threshold) for n, r in records.items()}


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


def needs_calibration(cfg: DecomposeConfig) -> bool:
    """Whether the decomposition needs layer Hessians (GPTQ base, or a curvature selector)."""
    return cfg.quant.method != "rtn" or (cfg.ortho and cfg.select.selector != "magnitude")


def _quantize_stage(prefix: str, linears: dict[str, nn.Linear], names: list[str],
                    hessians: dict[str, torch.Tensor], cfg: DecomposeConfig, block: nn.Module,
                    result: DecompositionResult, keep: bool,
                    select_hessians: dict[str, torch.Tensor] | None = None,
                    timer: PhaseTimer | None = None) -> None:
    timer = timer or PhaseTimer()
    for name in names:
        lin = linears[name]
        W = lin.weight.detach().float()
        with timer("quantize"):
            res = quantize(W, cfg.quant, hessians[name])
            base = res.to_stream()
        if "cholesky_s" in res.info:  # part of "quantize": the inverse Hessian factor
            timer.add("quantize_cholesky", res.info["cholesky_s"])
        full = f"{prefix}.{name}"
        result.base[full] = base
        H_sel = None if select_hessians is None else select_hessians[name]
        if cfg.ortho and cfg.select.scope == "layer":
            with timer("select"):
                result.ortho[full] = make_ortho(W, base, hessians[name] if H_sel is None else H_sel, cfg.select)
        if keep:
            result.records[full] = LayerRecord(W.clone(), base, hessians[name],
                                               {k: v for k, v in res.info.items() if k != "losses"}, H_sel)
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
    timer = PhaseTimer()
    with timer("capture"):
        flow = _Flow.capture(model, calibration, cfg.batch_size) if calibrate else None
        sel_flow = None if select_calibration is None else _Flow.capture(model, select_calibration, cfg.batch_size)
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
            stages = _linear_stages(block, linears, flow.hidden[0], flow.kws[0])
        for stage in stages if true_sequential else [[n for s in stages for n in s]]:
            sel = None if sel_flow is None else sel_flow.hessians(block, linears, stage, timer,
                                                                 "select_hessian_accumulate")
            _quantize_stage(prefix, linears, stage, flow.hessians(block, linears, stage, timer), cfg, block, result,
                            keep, sel, timer)
            peak = max(peak, psutil.Process().memory_info().rss)
        for f in (flow, sel_flow):
            if f is not None:
                f.advance(block, timer)
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
                    "true_sequential": true_sequential,
                    "phase_s": timer.exclusive(), "phase_calls": dict(timer.calls)}
    return result
