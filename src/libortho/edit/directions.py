"""Behaviour directions: residual-stream means of two prompt sets, their difference, its aggregation.

Seed 003: run prompts that show a behaviour (set A) and prompts that do not (set B), read the
residual stream after every decoder layer at the last prompt position (or averaged over the
post-instruction positions: the chat template's end of turn and assistant header), take
``v_l = mu_A - mu_B`` per layer, weigh the target layers (``l >= 0.7 L``) by ``S(l) = ||v_l||`` and
average, ``v_bar = sum_l S(l) v_l / sum_l S(l)``, ``u = v_bar / ||v_bar||``. The mathematics
(:func:`difference_of_means`, :func:`aggregate_direction`, :func:`target_layers`) are pure functions
over tensors; :func:`residual_means` is the one place that runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from libortho.data.prompts import encode_prompt, pad_id, post_instruction_len, prompt_batches

Positions = Literal["last", "post_instruction"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Hugging Face causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no model.layers list: not a decoder-only causal LM")
    return layers


def target_layers(n_layers: int, min_fraction: float = 0.7, max_fraction: float = 1.0) -> list[int]:
    """Layers ``floor(min_fraction * L) <= l < max_fraction * L`` (the seed's window is ``l >= 0.7 L``; the
    floor keeps one layer in a shallow model: L = 2 gives layer 1, L = 30 gives 21..29)."""
    if not 0 <= min_fraction < max_fraction <= 1:
        raise ValueError(f"need 0 <= min_fraction < max_fraction <= 1, got {min_fraction}, {max_fraction}")
    layers = [i for i in range(n_layers) if int(min_fraction * n_layers) <= i < max_fraction * n_layers]
    if not layers:
        raise ValueError(f"the window [{min_fraction}, {max_fraction}) holds no layer of {n_layers}")
    return layers


def difference_of_means(acts_a: torch.Tensor, acts_b: torch.Tensor) -> torch.Tensor:
    """``mu_A - mu_B`` per layer: ``acts_* (L, n_*, d)`` -> ``(L, d)``, in float64 sums."""
    if acts_a.dim() != 3 or acts_b.dim() != 3 or acts_a.shape[0] != acts_b.shape[0] \
            or acts_a.shape[2] != acts_b.shape[2]:
        raise ValueError(f"activations must be (L, n, d) with equal L and d, got {tuple(acts_a.shape)}, "
                         f"{tuple(acts_b.shape)}")
    if acts_a.shape[1] < 1 or acts_b.shape[1] < 1:
        raise ValueError("each prompt set needs at least one prompt")
    return (acts_a.double().mean(1) - acts_b.double().mean(1)).float()


def aggregate_direction(diffs: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """The seed's unit direction: ``sum_l S(l) v_l / sum S`` over ``layers`` with ``S(l) = ||v_l||``, normalised."""
    if not layers:
        raise ValueError("aggregate_direction needs at least one layer")
    v = diffs[list(layers)].double()
    s = v.norm(dim=1)
    if not float(s.sum()) > 0:
        raise ValueError("the two prompt sets have identical means on every target layer: no direction")
    vbar = (s.unsqueeze(1) * v).sum(0) / s.sum()
    n = vbar.norm()
    if not float(n) > 0:
        raise ValueError("the per-layer differences cancel: the aggregated direction is zero")
    return (vbar / n).float()


def unit_rows(diffs: torch.Tensor) -> torch.Tensor:
    """Every layer's difference as a unit vector (zero rows stay zero)."""
    n = diffs.norm(dim=1, keepdim=True)
    return torch.where(n > 0, diffs / n.clamp_min(torch.finfo(diffs.dtype).tiny), torch.zeros_like(diffs))


@torch.no_grad()
def residual_means(model: nn.Module, tokenizer: Any, prompts: Sequence[str], positions: Positions = "last",
                   batch_size: int = 16) -> torch.Tensor:
    """Mean residual stream after every decoder layer over ``prompts``: ``(L, d)`` in float64-summed fp32.

    ``positions="last"`` reads the last prompt token; ``"post_instruction"`` averages the template's
    tokens after the user's text (falls back to the last token for a model without a chat template).
    """
    if not prompts:
        raise ValueError("residual_means needs at least one prompt")
    if positions not in ("last", "post_instruction"):
        raise ValueError(f"unknown positions {positions!r} (last, post_instruction)")
    layers = decoder_layers(model)
    k = max(1, post_instruction_len(tokenizer)) if positions == "post_instruction" else 1
    sums = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64)
    grabbed: list[torch.Tensor] = []

    def grab(_m: nn.Module, _a: Any, out: Any) -> None:
        h = out[0] if isinstance(out, tuple) else out
        grabbed.append(h[:, -k:, :].double().mean(1))

    handles = [layer.register_forward_hook(grab) for layer in layers]
    try:
        rows = [encode_prompt(tokenizer, p) for p in prompts]
        for batch in prompt_batches(rows, pad_id(tokenizer), batch_size):
            grabbed.clear()
            model(**batch.model_inputs(), use_cache=False)
            sums += torch.stack([g.sum(0) for g in grabbed])
    finally:
        for h in handles:
            h.remove()
    return (sums / len(prompts)).float()


@dataclass(frozen=True)
class Directions:
    """Per-layer differences of means, the aggregated unit direction, and how it was made."""

    diffs: torch.Tensor  # (L, d): mu_A - mu_B after each decoder layer
    direction: torch.Tensor  # (d,): the S(l)-weighted unit direction over ``layers``
    layers: tuple[int, ...]  # the aggregation layers
    positions: str

    @property
    def scores(self) -> list[float]:
        """``S(l) = ||v_l||`` for every layer."""
        return [float(x) for x in self.diffs.norm(dim=1)]

    def layer_direction(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s own unit direction."""
        return unit_rows(self.diffs)[layer]


def find_directions(model: nn.Module, tokenizer: Any, with_behaviour: Sequence[str], without: Sequence[str],
                    min_fraction: float = 0.7, positions: Positions = "last", batch_size: int = 16) -> Directions:
    """Directions from two prompt sets (A shows the behaviour, B does not)."""
    diffs = (residual_means(model, tokenizer, with_behaviour, positions, batch_size)
             - residual_means(model, tokenizer, without, positions, batch_size))
    layers = target_layers(diffs.shape[0], min_fraction)
    return Directions(diffs, aggregate_direction(diffs, layers), tuple(layers), positions)
