"""Step rules: how one optimizer step turns training rows into gradients.

The training loop (:mod:`libortho.train.loop`) owns data order, the optimizer, schedule,
clipping, checkpoints and distribution; a :class:`StepRule` owns the rest: which parameters
train (in named groups, each clipped on its own), which loss reaches which group, and what
happens after the optimizer step (e.g. an OGD projection). :class:`PlainRule` is ordinary
fine-tuning; :class:`RoutedRule` sends the loss of public tokens to the shared weights and the
loss of private tokens to the memory parameters only, the core of the separation methods.

Every loss is normalised by *global* token counts (:class:`StepCounts`, over every process and
micro-batch of the step), so gradient accumulation and data-parallel workers give the update of
one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from libortho.data.records import IGNORE, TokenRows


@dataclass(frozen=True)
class StepCounts:
    """Label-token counts of one optimizer step over all processes: public and private tokens."""

    public: int
    private: int

    @property
    def total(self) -> int:
        return self.public + self.private

    @staticmethod
    def of(rows: TokenRows) -> StepCounts:
        """Counts of the rows' loss-carrying tokens (the first label of a row is never scored)."""
        labelled = rows.labels[:, 1:] != IGNORE
        private = rows.private_mask()[:, 1:] & labelled
        n_priv = int(private.sum())
        return StepCounts(int(labelled.sum()) - n_priv, n_priv)


@dataclass
class ParamGroup:
    """Parameters that train together: one optimizer group, clipped on its own."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0


def token_nll(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL ``(n, L-1)`` in fp32; 0 where the label is ``-100``."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    target = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                      ignore_index=IGNORE, reduction="none")
    return nll.view(target.shape)


def check_finite(loss: torch.Tensor) -> None:
    """Refuse a non-finite loss with a message that says what to do."""
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite training loss: lower the learning rate or check the data")


class StepRule:
    """Plain fine-tuning of every trainable parameter; subclasses route losses to parameter groups."""

    name = "plain"
    group_private_rows = False  # put rows with private tokens into micro-batches of their own

    def row_groups(self, rows: TokenRows, step: int) -> torch.Tensor:
        """An integer key per row: rows with different keys never share a micro-batch (ascending key order).

        Default: 0 for every row, or (``group_private_rows``) 1 for rows holding private tokens.
        """
        if not self.group_private_rows or rows.private is None:
            return torch.zeros(len(rows), dtype=torch.long)
        return rows.private.any(dim=1).long()

    def groups(self, model: nn.Module) -> list[ParamGroup]:
        """The trainable parameters, by group."""
        return [ParamGroup("all", [p for p in model.parameters() if p.requires_grad])]

    def active(self, step: int, counts: StepCounts) -> list[bool]:
        """Which groups receive gradients this step (the same on every process: counts are global)."""
        return [counts.total > 0]

    def micro(self, model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        """Accumulate the gradients of one micro-batch; returns its summed token loss."""
        nll = token_nll(model, rows.input_ids, rows.labels)
        loss = nll.sum()
        check_finite(loss)
        (loss / max(1, counts.total)).backward()
        return float(loss.detach())

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (projections, logging)."""

    def state(self) -> dict[str, Any]:
        """What identifies this rule in a checkpoint (a resumed run must use the same)."""
        return {"rule": self.name}

    def log(self) -> dict[str, Any]:
        """Rule-specific records of the run (e.g. eta during training)."""
        return {}


@dataclass
class RoutedRule(StepRule):
    """Public-token loss trains ``shared`` only; private-token loss trains ``memory`` only.

    Two backward passes over one forward graph, each restricted with ``backward(inputs=...)``, so
    a private token's gradient never reaches a shared weight (not even through attention to the
    public tokens before it) and vice versa. ``memory_off`` (set by subclasses per step) switches
    the memory out of the forward pass.
    """

    shared: list[nn.Parameter] = field(default_factory=list)
    memory: list[nn.Parameter] = field(default_factory=list)
    memory_lr_scale: float = 1.0
    train_shared: bool = True
    name: str = "routed"
    group_private_rows = True

    def groups(self, model: nn.Module) -> list[ParamGroup]:
        if not self.memory:
            raise ValueError("a routed rule needs memory parameters (attach a memory first)")
        groups = [ParamGroup("memory", self.memory, self.memory_lr_scale)]
        if self.train_shared:
            groups.insert(0, ParamGroup("shared", self.shared))
        return groups

    def active(self, step: int, counts: StepCounts) -> list[bool]:
        flags = [counts.private > 0]
        return ([counts.public > 0] + flags) if self.train_shared else flags

    def micro(self, model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        nll = token_nll(model, rows.input_ids, rows.labels)
        private = rows.private_mask()[:, 1:]
        priv = nll[private].sum()
        pub = nll.sum() - priv
        check_finite(pub + priv)
        has_priv = bool(private.any())
        if self.train_shared and counts.public > 0:
            (pub / counts.public).backward(inputs=self.shared, retain_graph=has_priv)
        if has_priv:
            (priv / counts.private).backward(inputs=self.memory)
        return float((pub + priv).detach())

    def state(self) -> dict[str, Any]:
        return {"rule": self.name, "memory_lr_scale": self.memory_lr_scale, "train_shared": self.train_shared}
