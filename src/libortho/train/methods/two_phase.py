"""``two-phase``: public fine-tuning first, then only the memory learns the private tokens.

Phase 1 is ordinary fine-tuning on every row with the private tokens masked out of the loss (the
same model as the "retrain, secrets masked" reference, so an experiment can pass it in and train
it once). Phase 2 adds memory neurons to every MLP and trains only them, on the rows that hold
private records and (``phase2_public``, the default) the public rows too: on every token of those
rows (``phase2_loss = "records"``, the default) or on the private tokens alone (``"secrets"``).
The public rows matter for alpha = 1: neurons that only ever saw the records learn to fire on
them and, never told to stay quiet elsewhere, distort held-out text (on the tiny model revision 2
more than doubled alpha = 1 perplexity); with every token of the public rows in their loss they
learn to leave public text alone. With perfect labels the shared weights never see a
private token, so alpha = 0 is the public-only model by construction: the control every other
method must beat (under label noise, or on skill).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from torch import nn

from libortho.data.records import TokenRows
from libortho.train.loop import TrainConfig, train
from libortho.train.memory import attach_neurons, memory_parameters, shared_parameters
from libortho.train.rules import ParamGroup, RoutedRule, StepCounts, StepRule, check_finite, token_nll
from libortho.train.separation import SEPARATION, Separation, SeparationResult, _every


def phase2_config(cfg: TrainConfig, phase2: TrainConfig | None, n_private_rows: int, n_rows: int) -> TrainConfig:
    """Phase 2's schedule: given, else ``cfg`` with as many passes over the private rows as phase 1 makes."""
    if phase2 is not None:
        return phase2
    steps = cfg.total_steps(n_rows)
    per_step = cfg.batch_size * cfg.grad_accum
    passes = steps * per_step / max(1, n_rows)
    return replace(cfg, steps=max(1, math.ceil(passes * n_private_rows / per_step)))


class MemoryOnlyRule(StepRule):
    """Every labelled token's loss, reaching the memory parameters only."""

    name = "two-phase/records"

    def __init__(self, memory: list[nn.Parameter], lr_scale: float) -> None:
        self.memory, self.lr_scale = memory, lr_scale

    def groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("memory", self.memory, self.lr_scale)]

    def micro(self, model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        nll = token_nll(model, rows.input_ids, rows.labels)
        loss = nll.sum()
        check_finite(loss)
        (loss / max(1, counts.total)).backward(inputs=self.memory)
        return float(loss.detach())

    def state(self) -> dict:
        return {"rule": self.name, "lr_scale": self.lr_scale}


@SEPARATION.register("two-phase", needs_labels=True, memory="neurons")
class TwoPhase(Separation):
    name = "two-phase"
    revision = 3  # 2: phase 2 learns every token of the private records (phase2_loss); 3: and the public rows

    def attach(self, model: nn.Module, data: TokenRows, probe: TokenRows | None) -> StepRule:
        attach_neurons(model, self.cfg.neurons, self.ctx, seed=self.cfg.seed)
        if self.cfg.phase2_loss == "records":
            return MemoryOnlyRule(memory_parameters(model), self.cfg.memory_lr_scale)
        return RoutedRule(shared=shared_parameters(model), memory=memory_parameters(model),
                          memory_lr_scale=self.cfg.memory_lr_scale, train_shared=False, name="two-phase/memory")

    def fit(self, model: nn.Module, data: TokenRows, probe: TokenRows | None = None, progress: bool = True,
            checkpoint_dir: str | Path | None = None, phase1_done: bool = False) -> SeparationResult:
        """Phase 1 (skipped with ``phase1_done``: ``model`` is already the public-only model), then phase 2."""
        t0 = time.perf_counter()
        logs = {}
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir)
        if not phase1_done:
            public = data.without_private_loss()
            logs["phase1"] = train(model, public, self.cfg.train, progress=progress, desc="two-phase: public",
                                   checkpoint_dir=None if ckpt is None else ckpt / "phase1",
                                   checkpoint_every=_every(self.cfg.train, public))
        has_private = data.private_mask().any(dim=1).nonzero().flatten()
        if has_private.numel() == 0:
            raise ValueError("two-phase needs rows with private tokens for its memory phase")
        rows2 = data if self.cfg.phase2_public else data.subset(has_private)
        cfg2 = phase2_config(self.cfg.train, self.cfg.phase2, len(rows2), len(data))
        rule = self.with_fake_quant(self.attach(model, data, probe), model, cfg2.total_steps(len(rows2)))
        logs["phase2"] = train(model, rows2, cfg2, progress=progress, desc="two-phase: memory", rule=rule,
                               checkpoint_dir=None if ckpt is None else ckpt / "phase2",
                               checkpoint_every=_every(cfg2, rows2))
        return self.finish(model, logs, t0, rule)
