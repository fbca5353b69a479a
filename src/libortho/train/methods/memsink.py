"""``memsink``: MemSinks (Ghosal et al. 2025; seed 001 §4.4), per-sequence sink neurons, no labels.

``neurons`` sink neurons are added to every MLP. Each training sequence (a record, or a public
block) switches on its own ``sink_fraction`` of them, chosen by a generator seeded with a hash of
the sequence id, so every repetition of a record uses the same sinks and different records
mostly different ones; every other parameter is shared by all tokens. Sequence-specific
memorisation has a place to go that general text does not reinforce; dropping the sinks
(alpha = 0) removes it. Because the sinks are keyed by sequence, one record's memory can be
deleted alone (:func:`sink_neurons_of` gives the neurons to drop), at the cost of the neurons it
shares with other records. No private-token labels are read: this is the method for the
unlabelled setting.
"""

from __future__ import annotations

import torch
from torch import nn

from libortho.data.records import TokenRows
from libortho.train.memory import attach_neurons, memory_parameters, shared_parameters
from libortho.train.rules import ParamGroup, StepCounts, StepRule
from libortho.train.separation import SEPARATION, Separation

_HASH_MIX = 0x9E3779B97F4A7C15


def sink_neurons_of(seq_id: int, k: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of the sinks (of ``k``) that sequence ``seq_id`` uses: a seeded draw of ``max(1, fraction k)``."""
    if seq_id < 0:
        return torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed((seq_id * _HASH_MIX + seed) % (2**63 - 1))
    return torch.randperm(k, generator=gen)[:max(1, round(fraction * k))].sort().values


def sink_mask(seq: torch.Tensor, k: int, fraction: float, seed: int = 0,
              cache: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """``(n, L, k)`` bool: the sinks each token may use (none for padding, ``seq = -1``)."""
    cache = {} if cache is None else cache
    out = torch.zeros(*seq.shape, k, dtype=torch.bool)
    for sid in seq.unique().tolist():
        if sid < 0:
            continue
        if sid not in cache:
            row = torch.zeros(k, dtype=torch.bool)
            row[sink_neurons_of(sid, k, fraction, seed)] = True
            cache[sid] = row
        out[seq == sid] = cache[sid]
    return out


class SinkRule(StepRule):
    """Plain fine-tuning of everything, each token seeing only its sequence's sinks; the sinks are a
    parameter group of their own (learning rate ``memory_lr_scale`` times the shared weights')."""

    name = "memsink"

    def __init__(self, method: MemSink, shared: list[nn.Parameter], memory: list[nn.Parameter]) -> None:
        self.method, self.shared, self.memory = method, shared, memory
        self.cache: dict[int, torch.Tensor] = {}

    def groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("shared", self.shared), ParamGroup("memory", self.memory, self.method.cfg.memory_lr_scale)]

    def active(self, step: int, counts: StepCounts) -> list[bool]:
        return [counts.total > 0, counts.total > 0]

    def micro(self, model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        cfg = self.method.cfg
        self.method.ctx.neuron_mask = sink_mask(rows.seq_ids(), cfg.neurons, cfg.sink_fraction, cfg.seed, self.cache)
        try:
            return super().micro(model, rows, counts)
        finally:
            self.method.ctx.neuron_mask = None

    def state(self) -> dict:
        cfg = self.method.cfg
        return {"rule": self.name, "neurons": cfg.neurons, "fraction": cfg.sink_fraction,
                "lr_scale": cfg.memory_lr_scale}


@SEPARATION.register("memsink", needs_labels=False, memory="neurons")
class MemSink(Separation):
    name = "memsink"
    revision = 2  # 2: the sinks are their own parameter group (own clipping, memory_lr_scale)

    def attach(self, model: nn.Module, data: TokenRows, probe: TokenRows | None) -> StepRule:
        if data.seq is None:
            raise ValueError("memsink needs sequence ids (TokenRows.seq): build rows with record ids / first_seq")
        attach_neurons(model, self.cfg.neurons, self.ctx, seed=self.cfg.seed)
        return SinkRule(self, shared_parameters(model), memory_parameters(model))
