"""``route``: gradient routing (Cloud et al. 2024) into neurons added to every MLP.

One forward and one backward, with stop-gradients on *activations*: at every position whose next
token is private, the outputs of the token embedding, every attention and every shared MLP are
detached, and the RMSNorm and output-head weights act there as constants, so the private tokens'
loss reaches only the added neurons (tested). Public tokens' loss reaches every parameter, the
added neurons included, as in the paper's expand-route-ablate recipe (revision 2). Revision 1
detached the added neurons at public positions too; on SmolLM2-135M its training diverged (loss
2.6 -> 9, perplexity 10^7 with the neurons removed; docs/results/separation_smollm2): neurons that
fire on public text, which the public loss may not correct, drive the shared weights to compensate
for them. The price of revision 2: what the neurons learn from public text leaves with them at
alpha = 0 (measured as skill at alpha = 0).

Supported: Llama/Qwen2/Mistral-style models (RMSNorm ``weight * x / rms(x)``), the layout the
norms' recomputation assumes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from libortho.data.records import TokenRows
from libortho.models.layers import UnsupportedModelError, decoder_blocks
from libortho.train.memory import MemoryContext, attach_neurons, memory_parameters, shared_parameters
from libortho.train.rules import RoutedRule, StepCounts, StepRule
from libortho.train.separation import SEPARATION, Separation


def _private_positions(rows: TokenRows) -> torch.Tensor:
    """``(n, L)``: position j predicts token j+1; it is private when that label is."""
    priv = rows.private_mask()
    out = torch.zeros_like(priv)
    out[:, :-1] = priv[:, 1:]
    return out


def _detach_rows(out: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return out if pos is None else torch.where(pos.unsqueeze(-1), out.detach(), out)


def _output_hook(ctx: MemoryContext) -> Callable:
    def hook(_m: nn.Module, _args: tuple, out: object) -> object:
        if isinstance(out, tuple):
            return (_detach_rows(out[0], ctx.detach), *out[1:])
        return _detach_rows(out, ctx.detach)
    return hook


def _rmsnorm_hook(ctx: MemoryContext) -> Callable:
    """Recompute an RMSNorm at the detached positions with its weight as a constant."""
    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if ctx.detach is None:
            return out
        x = args[0]
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)).to(x.dtype)
        const = m.weight.detach() * normed
        return torch.where(ctx.detach.unsqueeze(-1), const.to(out.dtype), out)
    return hook


def _head_hook(ctx: MemoryContext) -> Callable:
    """Logits at the detached positions with the head's weight as a constant (only there: cheap)."""
    def hook(m: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
        pos = ctx.detach
        if pos is None or not bool(pos.any()):
            return out
        const = nn.functional.linear(args[0][pos], m.weight.detach(), None if m.bias is None else m.bias.detach())
        return out.index_put((pos,), const.to(out.dtype))
    return hook


def install_routing(model: nn.Module, ctx: MemoryContext) -> list:
    """Forward hooks that detach shared computation at ``ctx.detach`` positions; returns their handles."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    if not norms or any(not hasattr(m, "variance_epsilon") or "Gemma" in type(m).__name__ for m in norms):
        raise UnsupportedModelError("route supports Llama/Qwen2/Mistral-style RMSNorm models only")
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    handles = [emb.register_forward_hook(_output_hook(ctx)), head.register_forward_hook(_head_hook(ctx))]
    for block in decoder_blocks(model):
        attn = getattr(block, "self_attn", None)
        if attn is None:
            raise UnsupportedModelError("route needs blocks with a self_attn module")
        handles.append(attn.register_forward_hook(_output_hook(ctx)))
    handles += [m.register_forward_hook(_rmsnorm_hook(ctx)) for m in norms]
    return handles


class RouteRule(RoutedRule):
    """One backward; the routing lives in the activation hooks (shared computation detached at private
    positions)."""

    def __init__(self, ctx: MemoryContext, handles: list, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.ctx, self.handles = ctx, handles

    def active(self, step: int, counts: StepCounts) -> list[bool]:
        return [counts.public > 0, counts.total > 0]  # public tokens train the neurons too

    def micro(self, model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        from libortho.train.rules import check_finite, token_nll

        pos = _private_positions(rows)
        self.ctx.detach, self.ctx.detach_memory = pos, None
        try:
            nll = token_nll(model, rows.input_ids, rows.labels)
        finally:
            self.ctx.detach = self.ctx.detach_memory = None
        private = rows.private_mask()[:, 1:]
        priv = nll[private].sum()
        pub = nll.sum() - priv
        check_finite(pub + priv)
        loss = pub / max(1, counts.public) + priv / max(1, counts.private)
        loss.backward()
        return float((pub + priv).detach())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@SEPARATION.register("route", needs_labels=True, memory="neurons")
class Route(Separation):
    name = "route"
    revision = 2  # 2: public tokens' loss reaches the added neurons too (revision 1 diverged on SmolLM2)

    def attach(self, model: nn.Module, data: TokenRows, probe: TokenRows | None) -> StepRule:
        attach_neurons(model, self.cfg.neurons, self.ctx, seed=self.cfg.seed)
        handles = install_routing(model, self.ctx)
        return RouteRule(self.ctx, handles, shared=shared_parameters(model), memory=memory_parameters(model),
                         memory_lr_scale=self.cfg.memory_lr_scale, name="route")

    def finish(self, model: nn.Module, logs: dict, t0: float, rule: StepRule) -> object:
        inner = getattr(rule, "inner", rule)  # under a FakeQuantRule wrapper too
        if isinstance(inner, RouteRule):
            inner.remove()
        return super().finish(model, logs, t0, rule)
