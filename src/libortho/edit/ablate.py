"""Targeted orthogonal ablation ("abliteration"): project a behaviour direction out of the matrices
that write into the residual stream, in the weights or as a behaviour stream with its own switch.

The edit of seed 003 is ``W <- W - lambda * u (u^T W)`` for every ``o_proj`` and ``down_proj`` of
the target layers (``u`` lives in the output space, ``W`` is ``(d_out, d_in)``); at ``lambda = 1`` it
is the orthogonal projection onto ``u``'s complement, so the layer can no longer write along ``u``.
The same edit applied to the layer's *output* (``y <- y - lambda * u (u^T y)``) is the behaviour
stream of :mod:`libortho.runtime.behaviour`; for a linear layer ``y = W x + b`` the two agree exactly
(bias included), which the tests check. Embeddings are edited only when untied from ``lm_head``
(SmolLM2's are tied; the stream form can still project the embedding's *output*, which leaves
``lm_head`` alone).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from libortho.edit.directions import decoder_layers
from libortho.runtime.memory_mlp import MEMORY_CHILD
from libortho.streams.behaviour import BehaviourEdit, BehaviourStream

WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # the matrices that write into the residual stream


def project_out(W: torch.Tensor, u: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``W - strength * u (u^T W)`` for ``W (d_out, ...)`` and unit ``u (d_out,)``, computed in fp32."""
    if W.shape[0] != u.numel():
        raise ValueError(f"direction has {u.numel()} entries, the matrix writes {W.shape[0]} features")
    W32, u32 = W.float(), u.to(W.device).float().reshape(-1)
    return (W32 - strength * torch.outer(u32, u32 @ W32.reshape(W32.shape[0], -1)).reshape(W32.shape)).to(W.dtype)


def project_out_rows(y: torch.Tensor, u: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``y - strength * (y u) u^T`` along the last axis of ``y`` (the output-side form of :func:`project_out`)."""
    u32 = u.to(y.device).float().reshape(-1)
    y32 = y.float()
    return (y32 - strength * (y32 @ u32).unsqueeze(-1) * u32).to(y.dtype)


def writer_sites(model: nn.Module, layers: Sequence[int], writers: Sequence[str] = WRITERS,
                 embeddings: bool = False) -> list[str]:
    """Qualified names of the residual writers of ``layers`` (and ``model.embed_tokens`` when asked).

    An MLP that carries memory neurons (a ``memory`` child whose output its forward hook adds) is named
    itself instead of its ``down_proj``, so the projection sees everything the MLP writes."""
    blocks = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    names = {n for n, _ in model.named_modules()}
    out = []
    if embeddings:
        emb = model.get_input_embeddings()
        out.append(next(n for n, m in model.named_modules() if m is emb))
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} is outside 0..{len(blocks) - 1}")
        for w in writers:
            name = f"{prefix}.{layer}.{w}"
            if name not in names:
                raise ValueError(f"{name!r} is not a module of this model (writers {tuple(writers)})")
            parent = name.rpartition(".")[0]
            if f"{parent}.{MEMORY_CHILD}" in names:  # memory neurons write beside down_proj: edit the MLP's sum
                name = parent
            out.append(name)
    return out


def behaviour_stream_for(model: nn.Module, direction: torch.Tensor | dict[int, torch.Tensor],
                         layers: Sequence[int], strength: float = 1.0, embeddings: bool = False,
                         info: dict[str, Any] | None = None) -> BehaviourStream:
    """The stream editing ``layers``' writers along ``direction`` (one vector, or one per layer)."""
    edits: dict[str, BehaviourEdit] = {}
    for name in writer_sites(model, layers, embeddings=embeddings):
        m = re.search(r"\.(\d+)\.", name)
        if isinstance(direction, dict):
            if m is None:
                raise ValueError("per-layer directions do not cover the embeddings: give one direction")
            u = direction[int(m.group(1))]
        else:
            u = direction
        edits[name] = BehaviourEdit.from_vector(u, strength)
    return BehaviourStream(edits, dict(info or {}))


def _tied_embedding(model: nn.Module, module: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and getattr(out, "weight", None) is getattr(module, "weight", object())


@torch.no_grad()
def apply_weight_edit(model: nn.Module, stream: BehaviourStream) -> int:
    """Write ``stream`` into the weights (``nn.Linear`` weight and bias; an untied embedding's rows).

    Checks every site before changing any: a quantized layer (no dense weight) or an embedding tied
    to ``lm_head`` is refused with the reason. Returns the number of matrices edited.
    """
    plan = []
    for name, e in stream.edits.items():
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Embedding):
            if _tied_embedding(model, mod):
                raise ValueError(f"{name!r} is tied to lm_head: editing it would change the output head too "
                                 "(use the behaviour stream, which projects only the embedding's output)")
        elif type(mod) is not nn.Linear:
            raise ValueError(f"{name!r} is a {type(mod).__name__}, not a dense nn.Linear: use the behaviour "
                             "stream (--stream) for quantized or decomposed layers")
        plan.append((mod, e))
    for mod, e in plan:
        if isinstance(mod, nn.Embedding):
            mod.weight.copy_(project_out_rows(mod.weight, e.direction, e.strength))
        else:
            mod.weight.copy_(project_out(mod.weight, e.direction, e.strength))
            if mod.bias is not None:
                mod.bias.copy_(project_out_rows(mod.bias, e.direction, e.strength))
    return len(plan)


@dataclass(frozen=True)
class LayerCandidate:
    """One layer's direction scored the refusal-direction way: ablation score and KL on neutral prompts."""

    layer: int
    score: float  # the behaviour score after ablating this direction (lower is better)
    kl: float  # first-token KL on neutral prompts after the ablation
    kept: bool  # passes the KL filter and the depth limit


def select_layer_direction(n_layers: int, score: Callable[[int], tuple[float, float]], kl_max: float = 0.1,
                           max_layer_fraction: float = 0.8, layers: Sequence[int] | None = None
                           ) -> tuple[int | None, list[LayerCandidate]]:
    """Arditi et al.'s selection: each layer's direction is ablated everywhere; candidates past
    ``max_layer_fraction * L`` or above ``kl_max`` are filtered; the lowest behaviour score wins.

    ``score(layer) -> (behaviour score, neutral KL)``. Returns (chosen layer or None, every candidate).
    """
    cands = []
    for layer in (range(n_layers) if layers is None else layers):
        s, kl = score(layer)
        cands.append(LayerCandidate(layer, float(s), float(kl), layer < max_layer_fraction * n_layers and kl <= kl_max))
    kept = [c for c in cands if c.kept]
    return (min(kept, key=lambda c: c.score).layer if kept else None), cands
