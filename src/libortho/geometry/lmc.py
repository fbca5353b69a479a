"""Linear mode connectivity: the loss along the straight line between two models (seed 001 §5).

``θ(t) = (1 - t) θ_a + t θ_b``; the barrier is the largest excess of the loss over the chord between
the end losses, ``max_t L(θ(t)) - [(1 - t) L(θ_a) + t L(θ_b)]``. A barrier near 0 says the two models
sit in one basin (e.g. the alpha = 0 model and a model retrained without the private data); a large
one says they do not. The path is over the *dense* weights of the two models (a quantized or
dual-stream model is read through its dequantized weights by the caller).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LMCCurve:
    """Losses at the points ``ts`` of the path and the barrier read from them."""

    ts: list[float]
    losses: list[float]

    @property
    def barrier(self) -> float:
        """``max_t L(t) - chord(t)`` (0 when the curve never rises above its chord)."""
        return barrier(self.ts, self.losses)


def barrier(ts: list[float], losses: list[float]) -> float:
    """Largest excess of ``losses`` over the chord between the first and last (``ts`` from 0 to 1)."""
    if len(ts) != len(losses) or len(ts) < 2 or ts[0] != 0.0 or ts[-1] != 1.0:
        raise ValueError("need matching ts and losses with ts running from 0 to 1")
    l0, l1 = losses[0], losses[-1]
    return max(max(lv - ((1 - t) * l0 + t * l1) for t, lv in zip(ts, losses, strict=True)), 0.0)


def interpolate(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], t: float
                ) -> dict[str, torch.Tensor]:
    """``(1 - t) a + t b`` for every floating tensor of two state dicts with the same keys and shapes."""
    if set(sd_a) != set(sd_b):
        diff = sorted(set(sd_a) ^ set(sd_b))[:3]
        raise ValueError(f"the two models have different parameters (e.g. {diff})")
    out = {}
    for k, a in sd_a.items():
        b = sd_b[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        out[k] = torch.lerp(a.double(), b.double(), t).to(a.dtype) if a.is_floating_point() else a
    return out


@torch.no_grad()
def lmc_curve(model_a: nn.Module, model_b: nn.Module, loss: Callable[[nn.Module], float], points: int = 11
              ) -> LMCCurve:
    """``loss`` at ``points`` evenly spaced models on the line from ``model_a`` to ``model_b``."""
    if points < 3:
        raise ValueError(f"need at least 3 points on the path, got {points}")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    ts = [i / (points - 1) for i in range(points)]
    losses = []
    for t in ts:
        probe.load_state_dict(interpolate(sd_a, sd_b, t))
        losses.append(float(loss(probe)))
    return LMCCurve(ts, losses)
