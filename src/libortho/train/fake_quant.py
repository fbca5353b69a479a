"""Fake-quantized base during the last part of training (quantization-aware separation).

The saved model's base stream is the shared weights quantized to INT4; a memory trained against the
full-precision shared weights learns to correct a base that alpha = 1 no longer has. Over the last
``fraction`` of the optimizer steps, :class:`FakeQuantRule` runs every forward and backward pass with
each block linear's shared weight replaced by its round-to-nearest INT4 value (straight-through: the
gradient computed at the quantized point updates the latent full-precision weight, BinaryConnect
style), so the memory (and, where a method trains them, the shared weights) adapt to the quantized
base. The latent weights are swapped back before every optimizer step and checkpoint, so training
state, checkpoints and the exported model hold full-precision weights, and GPTQ quantizes them later
as it would any model.

Round-to-nearest, not GPTQ: GPTQ's error feedback needs calibration Hessians per step; RTN on the same
grid is the cheap stand-in, and the test of this module checks it is exactly the RTN quantizer's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from libortho.config import QuantConfig
from libortho.data.records import TokenRows
from libortho.models.layers import block_linear_names
from libortho.quant.grid import dequantize_with_params, fit_group_params, quantize_with_params
from libortho.train.rules import ParamGroup, StepCounts, StepRule


@torch.no_grad()
def fake_quantize(W: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``W`` rounded to its RTN grid (``cfg``'s bits, group size, grid, symmetry) and dequantized, in ``W``'s
    dtype: :func:`~libortho.quant.rtn.rtn_quantize`'s values, with every full column group of every row
    fitted in one call of the same per-row grid fit (it runs on every block linear at every step)."""
    out_f, in_f = W.shape
    g = cfg.group_size
    Wf, full = W.float(), in_f // g * g
    parts = []
    if full:
        parts.append(_round_rows(Wf[:, :full].reshape(-1, g), cfg).reshape(out_f, full))
    if full < in_f:  # the partial last group is a group of its own, as the quantizer fits it
        parts.append(_round_rows(Wf[:, full:], cfg))
    return torch.cat(parts, 1).to(W.dtype)


def _round_rows(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Each row of ``w`` is one group: fit its grid, round to it, dequantize."""
    scale, zero = fit_group_params(w, cfg.bits, cfg.symmetric, cfg.grid)
    s, z = scale[:, None], zero[:, None]
    return dequantize_with_params(quantize_with_params(w, s, z, cfg.bits), s, z)


def start_step(total_steps: int, fraction: float) -> int:
    """First step (0-based) of the fake-quantized tail: the last ``fraction`` of ``total_steps``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fake-quant fraction must be in (0, 1], got {fraction}")
    return total_steps - max(1, round(fraction * total_steps))


class FakeQuantRule(StepRule):
    """``inner``'s step rule, with the weights ``weights`` fake-quantized from step ``start`` on."""

    def __init__(self, inner: StepRule, weights: dict[str, nn.Parameter], cfg: QuantConfig, start: int,
                 total: int) -> None:
        if not weights:
            raise ValueError("fake quantization needs at least one weight to quantize")
        self.inner, self.weights, self.cfg, self.start, self.total = inner, weights, cfg, start, total
        self.group_private_rows = inner.group_private_rows
        self.name = f"{inner.name}+fq"
        self.on = False  # whether the current step runs on the quantized weights
        self._quantized: dict[str, torch.Tensor] = {}
        self._trained: set[str] | None = None  # weights some optimizer group updates (None: assume all)

    def row_groups(self, rows: TokenRows, step: int) -> torch.Tensor:
        return self.inner.row_groups(rows, step)

    def groups(self, model: nn.Module) -> list[ParamGroup]:
        groups = self.inner.groups(model)
        ids = {id(p) for g in groups for p in g.params}
        self._trained = {n for n, w in self.weights.items() if id(w) in ids}
        return groups

    def active(self, step: int, counts: StepCounts) -> list[bool]:
        self.on = step >= self.start
        if self.on:
            # a weight changes only at an optimizer step: quantize a trained one once per step (for all its
            # micro-batches), a frozen one (two-phase's memory phase) once for the whole tail
            for n, w in self.weights.items():
                if n not in self._quantized or self._trained is None or n in self._trained:
                    self._quantized.pop(n, None)  # free the old copy before making the new one
                    self._quantized[n] = fake_quantize(w.detach(), self.cfg)
        return self.inner.active(step, counts)

    def micro(self, model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        if not self.on:
            return self.inner.micro(model, rows, counts)
        latent = {}
        with torch.no_grad():
            for name, w in self.weights.items():
                latent[name] = w.data
                w.data = self._quantized[name]
        try:
            return self.inner.micro(model, rows, counts)
        finally:
            for name, w in self.weights.items():
                w.data = latent[name]

    def after_step(self, model: nn.Module, step: int) -> None:
        self.inner.after_step(model, step)
        if step + 1 >= self.total:
            self._quantized = {}  # training is over: drop the quantized copies

    def state(self) -> dict[str, Any]:
        return {**self.inner.state(), "fake_quant": {"bits": self.cfg.bits, "group_size": self.cfg.group_size,
                                                     "grid": self.cfg.grid, "symmetric": self.cfg.symmetric,
                                                     "start": self.start}}

    def log(self) -> dict[str, Any]:
        return {**self.inner.log(), "fake_quant": {"start_step": self.start, "bits": self.cfg.bits,
                                                   "group_size": self.cfg.group_size,
                                                   "steps_quantized": self.total - self.start}}


def shared_block_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight Parameter of every decoder-block linear (what the INT4 base stream quantizes)."""
    return {n: model.get_submodule(n).weight for n in block_linear_names(model)}


def with_fake_quant(rule: StepRule, model: nn.Module, fraction: float, cfg: QuantConfig, total_steps: int
                    ) -> StepRule:
    """``rule`` itself when ``fraction`` is 0, else wrapped to fake-quantize the last ``fraction`` of the steps."""
    if fraction == 0:
        return rule
    return FakeQuantRule(rule, shared_block_weights(model), cfg, start_step(total_steps, fraction), total_steps)
