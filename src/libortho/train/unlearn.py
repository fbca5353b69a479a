"""Unlearning baselines on one forget set, in one registry.

- ``gradient_ascent``: maximise the token loss on the forget records;
- ``gradient_difference``: ascend on the forget records, descend on retain (public) rows;
- ``npo``: negative preference optimisation (Zhang et al. 2024), ``(2/beta) E[log(1 + (p/p_ref)^beta)]``
  on sequence likelihoods with the fine-tuned model as the reference, beta = 0.1 by default;
- ``retrain``: the gold standard, fine-tuning the pre-fine-tuning model on the public rows only.

Every method takes the fine-tuned model (modified in place, or replaced for ``retrain``), the
:class:`UnlearnTask` and an :class:`UnlearnConfig`, and :func:`run_unlearning` times it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from libortho.data.records import IGNORE, TokenRows
from libortho.train.loop import TrainConfig, batch_order, causal_lm_loss_sum, train


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings shared by the gradient-based baselines (one budget for all, for a fair comparison).

    steps: optimizer steps; batch_size: forget records per step; retain_batch_size: public rows per
    step (gradient difference, and NPO when ``npo_retain_weight > 0``); beta: NPO temperature.
    """

    steps: int = 20
    lr: float = 1e-5
    batch_size: int = 8
    retain_batch_size: int = 4
    beta: float = 0.1
    retain_weight: float = 1.0
    npo_retain_weight: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.retain_batch_size < 1:
            raise ValueError("steps, batch_size and retain_batch_size must be >= 1")
        if not self.lr > 0 or not self.beta > 0:
            raise ValueError("lr and beta must be > 0")
        if self.retain_weight < 0 or self.npo_retain_weight < 0:
            raise ValueError("retain weights must be >= 0")


@dataclass
class UnlearnTask:
    """The data every baseline sees: forget records (padded rows), retain rows, and for ``retrain``
    a loader of the pre-fine-tuning model with the public-only training data and config."""

    forget: TokenRows
    retain: TokenRows
    retrain_data: TokenRows | None = None
    retrain_config: TrainConfig | None = None
    load_pre: Callable[[], nn.Module] | None = None


@dataclass
class UnlearnOutcome:
    """The unlearned model, its wall time and a per-step log."""

    model: nn.Module
    wall_s: float
    log: dict[str, Any]


UnlearnMethod = Callable[[nn.Module, UnlearnTask, UnlearnConfig, bool], tuple[nn.Module, dict[str, Any]]]
UNLEARNING: dict[str, UnlearnMethod] = {}


def register_unlearning(name: str) -> Callable[[UnlearnMethod], UnlearnMethod]:
    """Decorator adding a method to :data:`UNLEARNING`."""

    def wrap(fn: UnlearnMethod) -> UnlearnMethod:
        UNLEARNING[name] = fn
        return fn

    return wrap


def run_unlearning(name: str, model: nn.Module, task: UnlearnTask, cfg: UnlearnConfig,
                   progress: bool = True) -> UnlearnOutcome:
    """Run baseline ``name`` on ``model`` (the fine-tuned model; modified in place) and time it."""
    if name not in UNLEARNING:
        raise KeyError(f"unknown unlearning method {name!r}; registered: {sorted(UNLEARNING)}")
    if len(task.forget) == 0:
        raise ValueError("the forget set is empty")
    t0 = time.perf_counter()
    out, log = UNLEARNING[name](model, task, cfg, progress)
    out.eval()
    return UnlearnOutcome(out, time.perf_counter() - t0, {"method": name, "config": asdict(cfg), **log})


def sequence_logprob(model: nn.Module, rows: TokenRows) -> torch.Tensor:
    """Sum of label-token log-probabilities of each row ``(n,)`` (differentiable)."""
    logits = model(input_ids=rows.input_ids, use_cache=False).logits[:, :-1].float()
    target = rows.labels[:, 1:]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (target != IGNORE)).sum(dim=1)


def _token_mean_loss(model: nn.Module, rows: TokenRows) -> torch.Tensor:
    loss_sum, n = causal_lm_loss_sum(model, rows.input_ids, rows.labels)
    return loss_sum / max(1, n)


def _loop(model: nn.Module, task: UnlearnTask, cfg: UnlearnConfig, progress: bool, desc: str,
          objective: Callable[[TokenRows, torch.Tensor, TokenRows], torch.Tensor]) -> dict[str, Any]:
    """Shared optimisation loop: ``objective(forget_batch, forget_idx, retain_batch)`` is minimised."""
    if len(task.forget) == 0:
        raise ValueError("the forget set is empty")
    forget_order = batch_order(len(task.forget), cfg.steps, min(cfg.batch_size, len(task.forget)), cfg.seed)
    retain_order = batch_order(len(task.retain), cfg.steps, min(cfg.retain_batch_size, len(task.retain)),
                               cfg.seed + 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    for step in tqdm(range(cfg.steps), desc=desc, disable=not progress, unit="step"):
        loss = objective(task.forget.subset(forget_order[step]), forget_order[step],
                         task.retain.subset(retain_order[step]))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
        loss.backward()
        if cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return {"steps": cfg.steps, "losses": losses}


@register_unlearning("gradient_ascent")
def gradient_ascent(model: nn.Module, task: UnlearnTask, cfg: UnlearnConfig,
                    progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Minimise the negative token loss on the forget records."""
    log = _loop(model, task, cfg, progress, "unlearn: gradient ascent",
                lambda f, _i, _r: -_token_mean_loss(model, f))
    return model, log


@register_unlearning("gradient_difference")
def gradient_difference(model: nn.Module, task: UnlearnTask, cfg: UnlearnConfig,
                        progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Ascend on the forget records while descending on retain rows (weight ``retain_weight``)."""
    log = _loop(model, task, cfg, progress, "unlearn: gradient difference",
                lambda f, _i, r: -_token_mean_loss(model, f) + cfg.retain_weight * _token_mean_loss(model, r))
    return model, log


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO objective ``(2/beta) mean log(1 + exp(beta (logp - logp_ref)))`` on sequence log-likelihoods."""
    return (2.0 / beta) * nn.functional.softplus(beta * (logp - logp_ref)).mean()


@register_unlearning("npo")
def npo(model: nn.Module, task: UnlearnTask, cfg: UnlearnConfig,
        progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """NPO against the model as it is now (the fine-tuned model) as reference; optional retain term."""
    with torch.no_grad():
        model.eval()
        ref = torch.cat([sequence_logprob(model, task.forget.subset(list(range(i, min(i + cfg.batch_size,
                                                                                     len(task.forget))))))
                         for i in range(0, len(task.forget), cfg.batch_size)])

    def objective(f: TokenRows, idx: torch.Tensor, r: TokenRows) -> torch.Tensor:
        loss = npo_loss(sequence_logprob(model, f), ref[idx], cfg.beta)
        if cfg.npo_retain_weight > 0:
            loss = loss + cfg.npo_retain_weight * _token_mean_loss(model, r)
        return loss

    log = _loop(model, task, cfg, progress, f"unlearn: NPO (beta={cfg.beta:g})", objective)
    return model, log


@register_unlearning("retrain")
def retrain(_model: nn.Module, task: UnlearnTask, _cfg: UnlearnConfig,
            progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a fresh pre-fine-tuning model on the public rows only (the fine-tuned model is unused)."""
    if task.load_pre is None or task.retrain_data is None or task.retrain_config is None:
        raise ValueError("retrain needs load_pre, retrain_data and retrain_config in the UnlearnTask")
    model = task.load_pre()
    log = train(model, task.retrain_data, task.retrain_config, progress=progress, desc="retrain (public only)")
    return model, {"steps": log.steps, "losses": log.losses, "tokens": log.tokens}
