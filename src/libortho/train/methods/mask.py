"""``mask``: selective gradient masking (Shilov et al. 2025), one model ``W = W_shared + M * delta``.

The memory support ``M`` is fixed before training: ``support_neurons`` existing neurons of every
MLP (their rows of ``gate_proj``/``up_proj`` and columns of ``down_proj``, drawn at random by the
seed), or a random ``support_fraction`` of every block linear's entries. The private tokens' loss
updates only ``delta``, the public tokens' loss only ``W_shared`` (:class:`RoutedRule`), and a
``memory_off_fraction`` of the steps without private tokens run with ``delta`` switched off, so
the shared weights learn to work alone (what alpha = 0 will ask of them).
"""

from __future__ import annotations

import torch
from torch import nn

from libortho.data.records import TokenRows
from libortho.models.layers import block_linears, block_prefix, decoder_blocks
from libortho.train.memory import (
    LinearMemorySpec,
    attach_linear_memory,
    gated_mlps,
    memory_parameters,
    shared_parameters,
)
from libortho.train.rules import RoutedRule, StepCounts, StepRule
from libortho.train.separation import SEPARATION, Separation


def neuron_supports(model: nn.Module, k: int, seed: int) -> dict[str, torch.Tensor]:
    """Masks of ``k`` random neurons per MLP: rows of gate/up, the same columns of down."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mlp in gated_mlps(model).items():
        d_ff = mlp.up_proj.out_features
        if k > d_ff:
            raise ValueError(f"support_neurons={k} exceeds the MLP width {d_ff}")
        pick = torch.randperm(d_ff, generator=gen)[:k]
        for proj in ("gate_proj", "up_proj"):
            m = torch.zeros_like(getattr(mlp, proj).weight, dtype=torch.bool)
            m[pick] = True
            out[f"{name}.{proj}"] = m
        m = torch.zeros_like(mlp.down_proj.weight, dtype=torch.bool)
        m[:, pick] = True
        out[f"{name}.down_proj"] = m
    return out


def entry_supports(model: nn.Module, fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """A random ``fraction`` of the entries of every block linear (at least one each)."""
    gen = torch.Generator().manual_seed(seed)
    prefix, out = block_prefix(model), {}
    for i, block in enumerate(decoder_blocks(model)):
        for rel, lin in block_linears(block).items():
            n = lin.weight.numel()
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.randperm(n, generator=gen)[:max(1, round(fraction * n))]] = True
            out[f"{prefix}.{i}.{rel}"] = m.view_as(lin.weight)
    return out


class MaskRule(RoutedRule):
    """:class:`RoutedRule` plus the memory switched off for a seeded share of the public-only rows.

    Each step, every row without private tokens is drawn "memory off" with probability
    ``memory_off_fraction`` from a generator seeded by (seed, step, the row's first sequence id),
    so the draw depends on the row, not on which process or micro-batch holds it. Rows drawn off
    form micro-batches of their own (:meth:`row_groups`), run without the memory: there the shared
    weights learn to work alone, as alpha = 0 will ask of them.
    """

    def __init__(self, method: Mask, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.method = method
        self.off_rows = self.public_rows = self._step = 0

    def _off(self, rows: TokenRows, step: int) -> torch.Tensor:
        cfg = self.method.cfg
        public = ~rows.private_mask().any(dim=1)
        if cfg.memory_off_fraction <= 0:
            return torch.zeros(len(rows), dtype=torch.bool)
        first = rows.seq_ids()[:, 0].tolist()
        draws = torch.tensor([float(torch.rand(1, generator=torch.Generator().manual_seed(
            (cfg.seed * 1_000_003 + step) * 7_919 + int(sid) % (2**40)))) for sid in first])
        return public & (draws < cfg.memory_off_fraction)

    def row_groups(self, rows: TokenRows, step: int) -> torch.Tensor:
        """0: public, memory on; 1: public, memory off; 2: rows with private tokens."""
        key = self._off(rows, step).long()
        key[rows.private_mask().any(dim=1)] = 2
        return key

    def active(self, step: int, counts: StepCounts) -> list[bool]:
        self._step = step
        return super().active(step, counts)

    def micro(self, model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        off = self._off(rows, self._step)
        self.public_rows += int((~rows.private_mask().any(dim=1)).sum())
        self.off_rows += int(off.sum())
        self.method.ctx.memory_on = not bool(off.all())
        try:
            return super().micro(model, rows, counts)
        finally:
            self.method.ctx.memory_on = True

    def state(self) -> dict:
        cfg = self.method.cfg
        return {**super().state(), "support": cfg.support, "off": cfg.memory_off_fraction}

    def log(self) -> dict:
        return {"memory_off_rows": self.off_rows, "public_rows": self.public_rows}


@SEPARATION.register("mask", needs_labels=True, memory="sparse")
class Mask(Separation):
    name = "mask"
    revision = 2  # 2: memory-off drawn per public row (per step it almost never fired)

    def attach(self, model: nn.Module, data: TokenRows, probe: TokenRows | None) -> StepRule:
        cfg = self.cfg
        supports = (neuron_supports(model, cfg.support_neurons, cfg.seed) if cfg.support == "neurons"
                    else entry_supports(model, cfg.support_fraction, cfg.seed))
        attach_linear_memory(model, LinearMemorySpec("sparse", supports), self.ctx, list(supports), cfg.seed)
        return MaskRule(self, shared=shared_parameters(model), memory=memory_parameters(model),
                        memory_lr_scale=cfg.memory_lr_scale, name="mask")
