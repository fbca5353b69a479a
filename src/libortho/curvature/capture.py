"""Calibration capture: the inputs of every linear of a decoder block, stage by stage.

GPTQ's true-sequential scheme needs, for each stage of a block (the linears that read one input:
q/k/v, o, gate/up, down), that input computed with the stages before it *already quantized*.
The textbook way reruns the whole block once per stage and hooks the linears: four block
forwards plus the one that advances the activations to the next block. Here a block is walked
by a :class:`BlockPlan` instead:

* :class:`PreNormGatedPlan` knows the pre-norm attention + gated-MLP layer (Llama, Mistral,
  Qwen2, SmolLM, ...). It computes each stage input from the previous stage's intermediate
  (attention core, residual after attention, MLP hidden), so one block costs one block forward
  in all, stages and advance together. It is used only after it has reproduced the block's own
  forward on a calibration sample to the last bit and found the same stages by hooks.
* :class:`GenericPlan` works for any block: one hooked forward per stage, stopped as soon as the
  stage's input is seen (the rest of the block is skipped), plus one full forward to advance.

Linears of one stage share one input, so they share one Hessian (accumulated once).
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from libortho.curvature.hessian import HessianAccumulator
from libortho.models.layers import decoder_blocks


class PhaseTimer:
    """Wall seconds and call counts per named phase; nested phases are subtracted from their parent.

    ``exclusive()`` gives each phase its own time (children removed), so the phases sum to the
    time spent inside any of them and a profile never counts a second twice.
    """

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._children: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []

    @contextlib.contextmanager
    def __call__(self, phase: str):  # noqa: ANN204 - a context manager
        self._stack.append(phase)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self._stack.pop()
            self.total[phase] += dt
            self.calls[phase] += 1
            if self._stack:
                self._children[self._stack[-1]] += dt

    def add(self, phase: str, seconds: float) -> None:
        """Record a sub-phase measured elsewhere (e.g. GPTQ's Cholesky); reported beside, not subtracted."""
        self.total[phase] += seconds
        self.calls[phase] += 1

    def exclusive(self) -> dict[str, float]:
        """Seconds per phase with the time of phases nested inside it removed."""
        return {p: self.total[p] - self._children.get(p, 0.0) for p in self.total}


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the wanted input has been seen."""


def batches(calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``(n, seq_len)`` token ids into batches, refusing anything else with a clear error."""
    if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calibration must be a (n, seq_len) integer tensor, got "
                         f"{tuple(calib.shape)} {calib.dtype}")
    if calib.shape[0] == 0:
        raise ValueError("calibration set is empty")
    return [calib[i:i + batch_size] for i in range(0, calib.shape[0], batch_size)]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the ``torch.distributed`` group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_batches(all_batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This worker's batches (every world-th, from its rank); all of them without a process group.

    Batch boundaries are those of the single-process run, so each batch's Hessian product is
    computed exactly as there, and the all-reduced fp64 sums match it bit for bit.
    """
    rank, world = rank_and_world()
    if world > 1 and len(all_batches) < world:
        raise ValueError(f"{len(all_batches)} calibration batches cannot be shared by {world} workers: "
                         f"use more calibration blocks or a smaller batch_size")
    return all_batches[rank::world]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int,
                         ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to decoder block 0; return its hidden-state inputs and kwargs per batch.

    Under ``torch.distributed`` each worker keeps only its share of the batches (:func:`shard_batches`).
    """
    first = decoder_blocks(model)[0]
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(hs.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        kw["use_cache"] = False
        kwargs_list.append(kw)
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in shard_batches(batches(calib, batch_size)):
            with contextlib.suppress(StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs_list


def block_out(block: nn.Module, hs: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder block returns (unwrapping HF's tuple outputs)."""
    out = block(hs, **kw)
    return out[0] if isinstance(out, tuple) else out


def kw_slice(kw: dict[str, Any], n: int) -> dict[str, Any]:
    """Slice batch-dimensioned tensors (and tuples of them) in block kwargs to the first n rows."""
    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > n:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kw.items()}


@dataclass(eq=False)
class CalibrationFlow:
    """Calibration activations entering the current decoder block (per batch), with the block kwargs."""

    hidden: list[torch.Tensor]
    kws: list[dict[str, Any]]

    @classmethod
    def capture(cls, model: nn.Module, tokens: torch.Tensor, batch_size: int) -> CalibrationFlow:
        return cls(*capture_block_inputs(model, tokens, batch_size))


@torch.no_grad()
def hooked_stages(block: nn.Module, linears: dict[str, nn.Linear], hs: torch.Tensor,
                  kw: dict[str, Any]) -> list[list[str]]:
    """Group the block's linears into stages of shared input, in call order (one forward on one sample)."""
    order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their addresses unique
    handles = [lin.register_forward_pre_hook(
        lambda _m, args, n=name: order.append((n, args[0]))) for name, lin in linears.items()]
    try:
        block_out(block, hs[:1], kw_slice(kw, 1))
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


class BlockWalk(abc.ABC):
    """One flow's pass through one block: ``stage_inputs(i)`` in stage order, then ``finish()``."""

    @abc.abstractmethod
    def stage_inputs(self, i: int) -> Iterator[torch.Tensor]:
        """Per batch, the input of stage ``i`` (stages before it must already be quantized)."""

    @abc.abstractmethod
    def finish(self) -> None:
        """Replace the flow's hidden states by the block's outputs (all stages quantized)."""


class BlockPlan(abc.ABC):
    """How a block is walked: its stages (lists of linear names) and a walk per calibration flow."""

    name: str
    stages: list[list[str]]

    @abc.abstractmethod
    def walk(self, flow: CalibrationFlow) -> BlockWalk:
        """A walk of ``flow`` through this block."""


class _GenericWalk(BlockWalk):
    def __init__(self, plan: GenericPlan, flow: CalibrationFlow) -> None:
        self.plan, self.flow = plan, flow

    def stage_inputs(self, i: int) -> Iterator[torch.Tensor]:
        stage = self.plan.stages[i]
        seen: list[torch.Tensor] = []

        def grab(_m: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            raise StopForward

        # the stage's members share one input: the first of them called ends the forward
        handles = [self.plan.linears[n].register_forward_pre_hook(grab) for n in stage]
        try:
            for hs, kw in zip(self.flow.hidden, self.flow.kws, strict=True):
                seen.clear()
                with contextlib.suppress(StopForward):
                    block_out(self.plan.block, hs, kw)
                if seen:  # a linear the block never calls has no inputs (and a zero Hessian)
                    yield seen[0]
        finally:
            for h in handles:
                h.remove()

    def finish(self) -> None:
        self.flow.hidden = [block_out(self.plan.block, hs, kw)
                            for hs, kw in zip(self.flow.hidden, self.flow.kws, strict=True)]


class GenericPlan(BlockPlan):
    """Any block: per stage one forward stopped at the stage's input; one full forward to advance."""

    name = "generic"

    def __init__(self, block: nn.Module, linears: dict[str, nn.Linear], stages: list[list[str]]) -> None:
        self.block, self.linears, self.stages = block, linears, stages

    def walk(self, flow: CalibrationFlow) -> BlockWalk:
        return _GenericWalk(self, flow)


_PRENORM_STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                   ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _linear_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the linears reading it will see it: cast to the autocast dtype when autocast is on.

    Caching the normalised input in that dtype costs half the memory and changes nothing the linears
    compute (they would cast it anyway); the plan's bit-exact self-check covers this.
    """
    if torch.is_autocast_enabled("cpu"):
        return x.to(torch.get_autocast_dtype("cpu"))
    return x


class _PreNormWalk(BlockWalk):
    """Pieces: 0 qkv input = norm1(h); 1 attention core; 2 norm2(h + o(core)); 3 act(gate) * up; finish.

    Each piece keeps (per batch) only what the next one needs: the normalised input, the attention
    core, the MLP hidden; the flow's hidden states become the residual after attention at piece 2.
    """

    def __init__(self, plan: PreNormGatedPlan, flow: CalibrationFlow) -> None:
        self.plan, self.flow = plan, flow
        self.piece = 0
        self.cache: list[torch.Tensor | None] = [None] * len(flow.hidden)

    def stage_inputs(self, i: int) -> Iterator[torch.Tensor]:
        piece = self.plan.pieces[i]
        while self.piece < piece:  # a piece whose linears are all skipped still has to be computed
            for _ in self._piece(self.piece):
                pass
            self.piece += 1
        yield from self._piece(piece)
        self.piece = piece + 1

    def _piece(self, piece: int) -> Iterator[torch.Tensor]:
        b, flow, cache = self.plan.block, self.flow, self.cache
        for k, (hs, kw) in enumerate(zip(flow.hidden, flow.kws, strict=True)):
            if piece == 0:
                cache[k] = _linear_input(b.input_layernorm(hs))
            elif piece == 1:
                cache[k] = self.plan.attention_core(cache[k], kw)
            elif piece == 2:
                mid = hs + b.self_attn.o_proj(cache[k])
                flow.hidden[k] = mid  # from here on the flow holds the residual after attention
                cache[k] = _linear_input(b.post_attention_layernorm(mid))
            else:
                x = cache[k]
                cache[k] = b.mlp.act_fn(b.mlp.gate_proj(x)) * b.mlp.up_proj(x)
            yield cache[k]

    def finish(self) -> None:
        while self.piece < 4:
            for _ in self._piece(self.piece):
                pass
            self.piece += 1
        down = self.plan.block.mlp.down_proj
        for k, mid in enumerate(self.flow.hidden):
            self.flow.hidden[k] = mid + down(self.cache[k])
            self.cache[k] = None


class PreNormGatedPlan(BlockPlan):
    """The pre-norm attention + gated-MLP decoder layer, walked piece by piece (one block forward in all)."""

    name = "prenorm-gated"

    def __init__(self, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self.block = block
        self.stages, self.pieces = [], []
        for piece, names in enumerate(_PRENORM_STAGES):
            kept = [n for n in names if n in linears]
            if kept:
                self.stages.append(kept)
                self.pieces.append(piece)

    def attention_core(self, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        """The attention's output before ``o_proj`` (q/k/v projections, rotary, softmax attention)."""
        seen: list[torch.Tensor] = []

        def grab(_m: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            raise StopForward

        handle = self.block.self_attn.o_proj.register_forward_pre_hook(grab)
        try:
            with contextlib.suppress(StopForward):
                self.block.self_attn(hidden_states=x, **{k: v for k, v in kw.items() if k != "use_cache"})
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError("the attention never called o_proj")
        return seen[0]

    def walk(self, flow: CalibrationFlow) -> BlockWalk:
        return _PreNormWalk(self, flow)

    @classmethod
    @torch.no_grad()
    def recognise(cls, block: nn.Module, linears: dict[str, nn.Linear], hs: torch.Tensor,
                  kw: dict[str, Any]) -> PreNormGatedPlan | None:
        """The plan if ``block`` is such a layer: same stages by hooks and the same output to the bit."""
        needed = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "mlp.act_fn",
                  *(n for s in _PRENORM_STAGES for n in s))
        if not all(_has_path(block, n) for n in needed):
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in (block, block.self_attn, block.mlp)):
            return None  # hooks (e.g. memory neurons) change what the block computes
        plan = cls(block, linears)
        if plan.stages != hooked_stages(block, linears, hs, kw):
            return None
        one, kw1 = [hs[:1]], [kw_slice(kw, 1)]
        probe = CalibrationFlow(list(one), kw1)
        walk = plan.walk(probe)
        for i in range(len(plan.stages)):
            for _ in walk.stage_inputs(i):
                pass
        walk.finish()
        if not torch.equal(probe.hidden[0], block_out(block, one[0], kw1[0])):
            return None
        return plan


def forward_precision(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Context for calibration forwards: CPU bf16 autocast for ``torch.bfloat16``, plain fp32 otherwise."""
    if dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _has_path(obj: object, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def block_plan(block: nn.Module, linears: dict[str, nn.Linear], flow: CalibrationFlow,
               dtype: torch.dtype = torch.float32) -> BlockPlan:
    """The fastest plan that provably computes this block as its own forward does (at ``dtype``)."""
    hs, kw = flow.hidden[0], flow.kws[0]
    with forward_precision(dtype):
        plan = PreNormGatedPlan.recognise(block, linears, hs, kw)
        return plan if plan is not None else GenericPlan(block, linears, hooked_stages(block, linears, hs, kw))


def stage_hessian(inputs: Iterator[torch.Tensor], d_in: int, timer: PhaseTimer,
                  phase: str = "hessian_accumulate", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One fp32 Hessian ``2/n X^T X`` over a stage's inputs (all its linears read the same X).

    The forwards producing X run at ``dtype`` (bf16: autocast) and so do the products ``X^T X``.
    Under ``torch.distributed`` the workers' sums are all-reduced, so each holds the full Hessian.
    """
    acc = HessianAccumulator(d_in, torch.float32, product_dtype=dtype)
    while True:
        with timer("stage_forward"), forward_precision(dtype):
            x = next(inputs, None)
        if x is None:
            if rank_and_world()[1] > 1:
                with timer("hessian_all_reduce"):
                    acc.all_reduce()  # data-parallel workers: every one gets the Hessian of all batches
            return acc.H
        with timer(phase):
            acc.add_batch(x.detach())
