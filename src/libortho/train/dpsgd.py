"""DP-SGD on a chosen set of parameters: Poisson sampling, per-example clipping, Gaussian noise, opacus' accountant.

The privacy unit is one training row (a row holds whole records: :func:`libortho.data.records.pack_records`).
Each step draws every row independently with probability ``q = expected_batch / N`` (the sampling the
RDP accountant assumes), computes each drawn row's gradient of its mean token loss *on its own*
(one backward per row: slow, and exactly the per-example gradient, with no per-layer
approximation), clips the gradient of the chosen parameters to L2 norm ``clip``, sums, adds
``N(0, (sigma * clip)^2)`` to every coordinate and divides by the expected batch size; an Adam step
follows (post-processing: it costs no privacy). ``sigma`` comes from the accountant for the target
``(eps, delta)`` at ``(q, steps)`` (:func:`libortho.train.dp.dpsgd_noise_multiplier`), or is given.

Only the chosen parameters move; every other parameter is frozen for the run (its ``requires_grad``
is restored afterwards), which is how "memory-only" DP, full-model DP on the linear layers and
"public, then private" DP differ (:mod:`libortho.experiments.dual_dp_sgd`). RMSNorm weights and
embeddings are never trained by it in those arms, as with opacus, which has no sampler for RMSNorm.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from libortho.data.records import TokenRows
from libortho.train.dp import dpsgd_epsilon, dpsgd_noise_multiplier
from libortho.train.loop import causal_lm_loss_sum


@dataclass(frozen=True)
class DPSGDConfig:
    """steps, expected batch (rows), clip norm, Adam learning rate; the target ``eps`` (None: no noise, no
    clipping, the non-private reference) and ``delta`` (None: ``1 / (10 N)``); ``sigma`` overrides the
    accountant when given; ``seed`` drives sampling and noise."""

    steps: int = 100
    expected_batch: float = 8.0
    clip: float = 1.0
    lr: float = 1e-3
    eps: float | None = 8.0
    delta: float | None = None
    sigma: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.expected_batch > 0 or not self.clip > 0 or not self.lr > 0:
            raise ValueError(f"need steps >= 1 and positive expected_batch, clip and lr, got {asdict(self)}")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be > 0 (or None for no privacy), got {self.eps}")
        if self.sigma is not None and not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def private(self) -> bool:
        return self.eps is not None or self.sigma is not None


@dataclass(frozen=True)
class DPSGDLog:
    """What a run did: noise multiplier, (eps, delta) spent per row, sampling rate, steps, rows drawn,
    fraction of per-row gradients that were clipped, losses, wall time."""

    sigma: float
    eps: float | None
    delta: float | None
    sample_rate: float
    steps: int
    rows_drawn: int
    clipped_fraction: float
    losses: list[float]
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def poisson_batch(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the rows drawn this step: each of ``n`` independently with probability ``rate``."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()


def row_gradient(model: nn.Module, params: list[nn.Parameter], rows: TokenRows, i: int) -> tuple[list[torch.Tensor],
                                                                                                  float]:
    """Gradient of row ``i``'s mean token loss with respect to ``params``, and the loss."""
    loss_sum, n = causal_lm_loss_sum(model, rows.input_ids[i:i + 1], rows.labels[i:i + 1])
    loss = loss_sum / max(n, 1)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)], float(loss)


def clip_and_sum(per_row: list[list[torch.Tensor]], clip: float | None) -> tuple[list[torch.Tensor], int]:
    """Sum of the per-row gradients, each scaled to L2 norm at most ``clip`` over all its tensors (None: unclipped);
    also how many were clipped."""
    total = [torch.zeros_like(g) for g in per_row[0]] if per_row else []
    clipped = 0
    for grads in per_row:
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        scale = 1.0
        if clip is not None and norm > clip:
            scale, clipped = clip / norm, clipped + 1
        for t, g in zip(total, grads, strict=True):
            t.add_(g, alpha=scale)
    return total, clipped


def noisy_mean(total: list[torch.Tensor], shapes: list[torch.Size], sigma: float, clip: float, denom: float,
               generator: torch.Generator) -> list[torch.Tensor]:
    """``(sum + N(0, (sigma clip)^2 I)) / denom`` per tensor (``total`` may be empty: a step that drew no row)."""
    total = total or [torch.zeros(s) for s in shapes]
    return [(t + (sigma * clip * torch.randn(t.shape, generator=generator) if sigma > 0 else 0.0)) / denom
            for t in total]


def dp_train(model: nn.Module, rows: TokenRows, params: list[nn.Parameter], cfg: DPSGDConfig,
             progress: bool = True, desc: str = "dp-sgd") -> DPSGDLog:
    """Train ``params`` of ``model`` on ``rows`` with DP-SGD (module docstring); returns the log."""
    n = len(rows)
    if n < 1 or not params:
        raise ValueError("DP-SGD needs at least one row and one parameter to train")
    rate = min(1.0, cfg.expected_batch / n)
    delta = cfg.delta if cfg.delta is not None else 1.0 / (10 * n)
    if cfg.sigma is not None:
        sigma = cfg.sigma
    elif cfg.eps is not None:
        sigma = dpsgd_noise_multiplier(cfg.eps, delta, rate, cfg.steps)
    else:
        sigma = 0.0
    ids = {id(p) for p in params}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, drawn, clipped, t0 = [], 0, 0, time.perf_counter()
    model.train()
    try:
        for _ in tqdm(range(cfg.steps), desc=desc, disable=not progress, unit="step"):
            batch = poisson_batch(n, rate, gen) if cfg.private() else torch.randperm(n, generator=gen)[
                :max(1, round(cfg.expected_batch))]
            per_row, step_loss = [], []
            for i in batch.tolist():
                g, loss = row_gradient(model, params, rows, i)
                per_row.append(g)
                step_loss.append(loss)
            total, c = clip_and_sum(per_row, cfg.clip if cfg.private() else None)
            drawn, clipped = drawn + len(per_row), clipped + c
            denom = cfg.expected_batch if cfg.private() else max(1, len(per_row))
            for p, g in zip(params, noisy_mean(total, [p.shape for p in params], sigma, cfg.clip, denom, gen),
                            strict=True):
                p.grad = g.to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(sum(step_loss) / len(step_loss) if step_loss else float("nan"))
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.eval()
    eps = dpsgd_epsilon(sigma, delta, rate, cfg.steps) if sigma > 0 else None
    return DPSGDLog(sigma, eps, delta if sigma > 0 else None, rate, cfg.steps, drawn,
                    clipped / drawn if drawn else 0.0, losses, time.perf_counter() - t0)
